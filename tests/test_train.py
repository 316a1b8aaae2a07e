"""The trainer end to end on the tiny shapes config (8 simulated devices)."""

import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_STEPS, tiny_config
from contrastive_jax import checkpointing, train, writers


def test_short_run_lowers_the_loss(tiny_run):
  config, workdir, results = tiny_run
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == TINY_STEPS // config.log_every_steps
  # Below ln(B), the loss of embeddings that cannot tell pairs apart.
  assert losses[-1] < min(losses[0], math.log(config.batch_size)) - 0.1, losses
  assert "zeroshot/shapes/acc1" in results and "retrieval/shapes/i2t_recall@1" in results
  steps = checkpointing.manager(workdir, keep=3).all_steps()
  assert max(steps) == TINY_STEPS and len(steps) <= config.checkpoint.keep
  assert any("steps_per_sec" in r for r in records)


def _checkpoint_done(workdir, step):
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tiny_run, tmp_path):
  config, reference_dir, _ = tiny_run
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "contrastive_jax.train",
         f"--config={REPO}/configs/clip_shapes.py:size=tiny,steps={TINY_STEPS}",
         f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not _checkpoint_done(workdir, 20) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not _checkpoint_done(workdir, TINY_STEPS)
  killed_at = checkpointing.manager(workdir, keep=3).latest_step()
  assert killed_at in (20, 40)

  resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {killed_at}" in resumed.stderr
  params, step = train.restore_variables(config, os.path.join(workdir, "checkpoints"))[3:]
  reference, _ = train.restore_variables(config, os.path.join(reference_dir, "checkpoints"))[3:]
  assert step == TINY_STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_with_the_step(tmp_path):
  config = tiny_config(**{"model.logit_scale_init": float("nan")})
  with pytest.raises(train.NonFiniteLossError, match="at step 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.manager(str(tmp_path), keep=3).all_steps() == []


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    train.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))

"""Training under faults: SIGKILL, a save killed half way, SIGTERM preemption, non-finite steps.

The chain of real subprocess runs in one workdir must end with parameters bit for bit equal to
the uninterrupted ``tiny_run``; the non-finite tests run the trainer in-process with NaN images
injected at chosen steps.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_STEPS, tiny_config
from contrastive_jax import checkpointing, preemption, train, writers
from contrastive_jax.data import pipeline, records


def _complete_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _wait(condition, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def test_killed_interrupted_and_preempted_runs_resume_exactly(tiny_run, tmp_path):
  config, reference_dir, _ = tiny_run
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "contrastive_jax.train",  # no evaluation: it changes no state
         f"--config={REPO}/configs/clip_shapes.py:size=tiny,steps={TINY_STEPS},eval=0",
         f"--workdir={workdir}"]
  # The compilation cache saves the runs after the first one their compile time.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jit"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  logs = [tmp_path / f"run{i}.log" for i in range(1, 6)]

  def start(i, **extra):
    with open(logs[i - 1], "w") as log:
      return subprocess.Popen(cmd, cwd=REPO, env=dict(env, **extra), stdout=subprocess.DEVNULL,
                              stderr=log)

  # 1. SIGKILL between checkpoints: after step 20 is complete, before 40.
  proc = start(1)
  _wait(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "20")), proc, "step 20")
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert _complete_steps(workdir) == [20]

  # 2. Resumes from 20; killed (by the test hook) while the checkpoint of step 40 is written.
  proc = start(2, **{checkpointing.KILL_DURING_SAVE_ENV: "40"})
  assert proc.wait(timeout=600) == -signal.SIGKILL
  assert "Resumed from step 20 " in logs[1].read_text()
  interrupted = os.path.join(workdir, "checkpoints", "40.orbax-checkpoint-tmp")
  assert os.path.isdir(interrupted) and _complete_steps(workdir) == [20]

  # 3. Resumes from 20 (not the interrupted 40); SIGTERM once step 30 is logged: the step
  # in progress is checkpointed and the run exits with status 75.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  seen = len(writers.read_jsonl(metrics_path))
  proc = start(3)
  _wait(lambda: any(r["step"] >= 30 and "train/loss" in r
                    for r in writers.read_jsonl(metrics_path)[seen:]), proc, "step 30")
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=600) == preemption.EXIT_PREEMPTED
  log = logs[2].read_text()
  assert (f"Interrupted checkpoint write (removed): {interrupted} (step 40). Resuming from the "
          "newest complete checkpoint: step 20." in log)
  assert "Resumed from step 20 " in log
  stopped = int(re.search(r"Preempted at step (\d+); checkpoint written; exit status 75",
                          log).group(1))
  assert 30 <= stopped < TINY_STEPS and _complete_steps(workdir)[-1] == stopped
  assert not os.path.exists(interrupted)

  # 4. Resumes from the preemption checkpoint; SIGKILL between checkpoints once step 50 is
  # logged (the third kill point: a step that is neither a checkpoint nor a log boundary of
  # the previous runs).
  seen = len(writers.read_jsonl(metrics_path))
  proc = start(4)
  _wait(lambda: any(r["step"] >= 50 and "train/loss" in r
                    for r in writers.read_jsonl(metrics_path)[seen:]), proc, "step 50")
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert f"Resumed from step {stopped} " in logs[3].read_text()
  last = _complete_steps(workdir)[-1]
  assert stopped <= last < TINY_STEPS

  # 5. Resumes from the newest complete checkpoint and finishes like the uninterrupted run.
  proc = start(5)
  assert proc.wait(timeout=600) == 0, logs[4].read_text()[-3000:]
  assert f"Resumed from step {last} " in logs[4].read_text()
  assert _complete_steps(workdir)[-1] == TINY_STEPS
  # The whole state: parameters, optimizer moments, objective state, RNG, step.
  final, reference = (_restore(config, d, TINY_STEPS) for d in (workdir, reference_dir))
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sigterm_sets_the_stop_flag_and_the_handler_is_restored():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert watcher.mode == "flag" and not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the watcher's handler
    deadline = time.time() + 10
    while not watcher.requested and time.time() < deadline:
      time.sleep(0.01)
    assert watcher.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) is previous


def _nan_images_at(monkeypatch, steps):
  """The trainer's batch for each step in ``steps`` (a fresh run) gets NaN images."""
  original = pipeline.as_numpy_batches

  def batches(ds):
    for step, batch in enumerate(original(ds), start=1):
      yield dict(batch, image=np.full_like(batch["image"], np.nan)) if step in steps else batch

  monkeypatch.setattr(pipeline, "as_numpy_batches", batches)


def _short_config(**overrides):
  return tiny_config(total_steps=8, log_every_steps=2, **{
      "checkpoint.every_steps": 2, "checkpoint.keep": 5, "eval.evaluators": {}, **overrides})


def _restore(config, workdir, step):
  """The full train state checkpointed at ``step``."""
  tokenizer, objective, mesh, optimizer = train.build(config)
  sample = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  shardings, abstract = train.state_shardings(config, objective, optimizer,
                                              records.pop_bookkeeping(sample)[0], mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  mngr = checkpointing.manager_at(os.path.join(workdir, "checkpoints"))
  return checkpointing.restore(mngr, abstract, step)[0]


def test_nonfinite_step_stops_naming_step_and_metrics_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  _nan_images_at(monkeypatch, {5})
  config = _short_config()
  with pytest.raises(train.NonFiniteLossError,
                     match=r"Non-finite loss, grad_norm, param_norm at step 5: .*'loss': nan"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _complete_steps(str(tmp_path)) == [2, 4]  # nothing at 6: the check came first
  state = _restore(config, str(tmp_path), 4)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_skip_nonfinite_keeps_params_bitwise_counts_and_stops_after_the_limit(
    tmp_path, monkeypatch):
  # Step 3 skipped alone; 5, 6 skipped (2 in a row, the limit); 7 is the third in a row.
  _nan_images_at(monkeypatch, {3, 5, 6, 7})
  config = _short_config(**{"optimizer.skip_nonfinite": True,
                            "optimizer.max_consecutive_nonfinite": 2})
  with pytest.raises(train.NonFiniteLossError,
                     match=r"at step 7: 3 non-finite steps in a row \(more than config"):
    train.train_and_evaluate(config, str(tmp_path))
  logged = {r["step"]: r for r in writers.read_jsonl(str(tmp_path / "metrics.jsonl"))
            if "train/skipped_nonfinite" in r}
  assert [logged[s]["train/skipped_nonfinite"] for s in (2, 4, 6)] == [0, 1, 3]
  # Means leave skipped steps out: step 4's is step 4's loss; 5 and 6 were both skipped.
  assert np.isfinite(logged[4]["train/loss"]) and "train/loss" not in logged[6]
  assert _complete_steps(str(tmp_path)) == [2, 4, 6]
  before, after = (_restore(config, str(tmp_path), s) for s in (4, 6))
  # Steps 5 and 6 were skipped: parameters, optimizer moments and schedule count unchanged.
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state.inner_state)),
                  jax.tree.leaves((after.params, after.opt_state.inner_state))):
    np.testing.assert_array_equal(a, b)
  assert (int(after.opt_state.notfinite_count), int(after.opt_state.total_notfinite)) == (2, 3)
  assert int(after.step) == 6

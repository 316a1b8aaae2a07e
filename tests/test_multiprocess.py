"""Real multi-process training: 2 processes × 4 CPU devices joined by ``jax.distributed`` on
127.0.0.1, started by ``launch/local.py`` and by ``launch/slurm_train.sbatch`` under a fake
SLURM environment, against the same config trained in this process on 8 devices."""

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, tiny_config
from contrastive_jax import train, writers

STEPS, EVERY = 8, 4
# A smaller final evaluation than the tiny config's keeps each launch short.
SMALL_EVAL = {"eval.evaluators.zeroshot.num_examples": 64,
              "eval.evaluators.retrieval.num_examples": 64}


def _train_args(workdir, steps=STEPS, every=EVERY, evaluate=True):
  """The trainer's arguments; ``evaluate=False`` skips the final evaluation (eval=0)."""
  overrides = dict(SMALL_EVAL if evaluate else {}, **{"checkpoint.every_steps": every})
  config = f"configs/clip_shapes.py:size=tiny,steps={steps},eval={int(evaluate)}"
  return ([f"--config={config}", f"--workdir={workdir}", "--heartbeat_timeout_s=5"] +
          [f"--config.{k}={v}" for k, v in overrides.items()])


def _local_launch(workdir, log_dir, **train_args):
  return [sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=4",
          f"--log_dir={log_dir}", "--grace_s=100", "--", sys.executable, "-m",
          "contrastive_jax.train", *_train_args(workdir, **train_args)]


def _params(config, workdir, step):
  """The parameters of ``workdir``'s checkpoint at ``step``, restored in this process."""
  return train.restore_variables(config, os.path.join(workdir, "checkpoints"), step)[3]


def _assert_close(a, b, atol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The same run in this one process on 8 devices: ``(config, workdir)``."""
  config = tiny_config(**SMALL_EVAL, **{"checkpoint.every_steps": EVERY})
  config.total_steps = STEPS
  workdir = str(tmp_path_factory.mktemp("one_process"))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_two_processes_equal_one_process(one_process, tmp_path):
  config, reference = one_process
  workdir, logs = tmp_path / "two", tmp_path / "logs"
  run = subprocess.run(_local_launch(workdir, logs), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stdout[-4000:]
  for i in range(2):
    log = (logs / f"process-{i}.log").read_text()
    assert f"process {i} of 2, 4 local devices, 8 devices in all" in log
  # The 2-process checkpoint restores in this single process and holds the same numbers.
  _assert_close(_params(config, str(workdir), STEPS), _params(config, reference, STEPS))
  # Process 0 alone writes the metrics: one record per logged step, not one per process.
  steps = [r["step"] for r in writers.read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert steps == sorted(set(steps)) and STEPS in steps


def test_one_process_checkpoint_resumes_in_two_slurm_tasks(one_process, tmp_path):
  """The sbatch script, driven by a fake srun, resumes a 1-process checkpoint in 2 processes
  (JAX's SLURM detection joins them) and lands on the 1-process numbers."""
  config, reference = one_process
  workdir = tmp_path / "resumed"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # keep step 4 only
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO}/tests/fake_srun.py" "$@"\n')
  srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             SLURM_JOB_ID=str(random.randrange(1000, 100000)), SLURM_JOB_NUM_NODES="1",
             SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO), LOG_DIR=str(tmp_path / "logs"),
             PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  command = ["bash", "launch/slurm_train.sbatch", *_train_args(workdir, evaluate=False)]
  run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  task_logs = [p.read_text() for p in sorted((tmp_path / "logs").glob("*.log"))]
  assert run.returncode == 0, run.stdout[-2000:] + "".join(t[-3000:] for t in task_logs)
  assert len(task_logs) == 2 and all("Resumed from step 4" in t for t in task_logs)
  assert all(f"process {i} of 2" in task_logs[i] for i in range(2))
  _assert_close(_params(config, str(workdir), STEPS), _params(config, reference, STEPS))


def test_killed_process_stops_the_other_and_the_relaunch_resumes(tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  total, every = 40, 5
  command = _local_launch(workdir, logs, steps=total, every=every, evaluate=False)
  launch = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  first = workdir / "checkpoints" / str(every)
  deadline = time.monotonic() + 400
  while not first.is_dir() and launch.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert first.is_dir(), launch.communicate(timeout=60)[0][-3000:]
  os.kill(int((logs / "process-1.pid").read_text()), signal.SIGKILL)
  killed = time.monotonic()
  out = launch.communicate(timeout=200)[0]
  # Process 0 ended by itself (JAX's heartbeat timeout, 5 s here), well before the launcher's
  # 100 s grace period would have terminated it.
  assert time.monotonic() - killed < 60, out[-3000:]
  assert launch.returncode != 0
  assert "[launch] process 1 exited with status 137" in out
  status0 = [l for l in out.splitlines() if l.startswith("[launch] process 0 exited")]
  assert status0 and not status0[0].endswith("status 0"), out[-3000:]
  done = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
  assert done and done[-1] < total, done  # it was really stopped mid-run

  # The same command again resumes from the newest complete checkpoint and finishes.
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-4000:]
  assert f"Resumed from step {done[-1]}" in (logs / "process-0.log").read_text()
  assert (workdir / "checkpoints" / str(total)).is_dir()


def test_two_hosts_stream_shards_and_resume_exactly(tmp_path):
  """Each process reads its own shard files; the checkpoint keeps both hosts' positions and
  bad-record counters (gathered across processes), and a resumed run continues exactly."""
  import stream_fixtures as sf
  from contrastive_jax import checkpointing
  pattern = sf.write_shards(str(tmp_path / "shards"))["pattern"]
  args = lambda workdir: [  # noqa: E731
      sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=4",
      f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", "contrastive_jax.train",
      f"--config=configs/clip_shards.py:data={pattern},size=tiny,steps=6,batch=8",
      f"--workdir={workdir}", "--config.checkpoint.every_steps=3",
      "--config.log_every_steps=3", "--heartbeat_timeout_s=5"]
  full = tmp_path / "full"
  run = subprocess.run(args(full), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-4000:]
  mngr = checkpointing.manager(str(full), keep=3)
  hosts = checkpointing.read_meta(mngr, 6)["data_position"]["hosts"]
  assert len(hosts) == 2 and hosts[0] != hosts[1]
  last = [r for r in writers.read_jsonl(full / "metrics.jsonl") if "train/loss" in r][-1]
  skipped = {k: v for k, v in last.items() if k.startswith("data/skipped_")}
  assert sum(skipped.values()) == sum(sum(h["counts"].get(k[len("data/skipped_"):], 0)
                                          for h in hosts) for k in skipped) > 0

  resumed = tmp_path / "resumed"
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  rerun = subprocess.run(args(resumed), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-4000:]
  assert "Resumed from step 3" in (tmp_path / "logs" / "process-1.log").read_text()
  a = checkpointing.read_meta(checkpointing.manager(str(resumed), keep=3), 6)
  assert a["data_position"] == checkpointing.read_meta(mngr, 6)["data_position"]
  config = load_config("clip_shards", f"data={pattern},size=tiny,steps=6,batch=8")
  _assert_close(_params(config, str(resumed), 6), _params(config, str(full), 6), atol=1e-6)

"""Cluster launchers: launch/tpu_pod.py (command plan, remote shell, packing, cleanup) and
launch/slurm_train.sbatch (driven by tests/fake_srun.py and a recording fake python)."""

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.py"
SBATCH = REPO / "launch" / "slurm_train.sbatch"
FAKE_SRUN = REPO / "tests" / "fake_srun.py"
HOSTILE = "--config.note=$(rm -rf ~);echo 'x' \"y\" `z` $HOME\\"


def _load_tpu_pod():
  spec = importlib.util.spec_from_file_location("tpu_pod", TPU_POD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu_pod = _load_tpu_pod()
LOC = ["--zone=us-central2-b", "--project=proj"]
BASE = ["--tpu", "pod1", "--zone", "us-central2-b", "--project", "proj", "--run_name", "r1"]
TRAIN = ["--config", "configs/clip_shards.py:data=gs://b/cc/*.tfrecord", "--workdir",
         "gs://b/run 1", HOSTILE]


def _ssh(command):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", *LOC, "--worker=all", "--command",
          command]


def _remote(cmd):
  """The remote shell command of a plan's ssh step."""
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in cmd
  return cmd[cmd.index("--command") + 1]


def test_default_version():
  assert tpu_pod.default_version("v4-32") == "tpu-ubuntu2204-base"
  assert tpu_pod.default_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
  assert tpu_pod.default_version("v5p-64") == "v2-alpha-tpuv5"
  assert tpu_pod.default_version("v6e-16") == "v2-alpha-tpuv6e"


def test_plan_copy_setup_run():
  args = tpu_pod.parse_args(BASE + ["--tfds_data_dir", "gs://b/tf ds", "--env", "A=1 2", "--",
                                    *TRAIN])
  cmds = tpu_pod.plan(args)
  tarball = os.path.join(tempfile.gettempdir(), "contrastive_jax-r1.tar.gz")
  assert cmds[:3] == [
      [sys.executable, str(TPU_POD), "--pack", tarball],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod1:contrastive_jax_code.tar.gz",
       *LOC, "--worker=all"],
      _ssh('set -e; rm -rf "$HOME"/contrastive_jax; mkdir -p "$HOME"/contrastive_jax; '
           'tar -xzf "$HOME"/contrastive_jax_code.tar.gz -C "$HOME"/contrastive_jax'),
  ]
  assert len(cmds) == 5
  setup = _remote(cmds[3])
  assert setup.startswith('set -e; cd "$HOME"/contrastive_jax; ')
  for part in ["sys.version_info < (3, 11)", "apt-get -qq install -y python3.11 python3.11-venv",
               '"$PY" -m venv "$HOME"/contrastive_jax_venv',
               ". \"$HOME\"/contrastive_jax_venv/bin/activate",
               "python -m pip install -q -U 'jax[tpu]'",
               "python -m pip install -q -r requirements.txt"]:
    assert part in setup
  run = _remote(cmds[4])
  assert cmds[4] == _ssh(run)
  assert run.startswith("set -o pipefail; ")
  assert "export TFDS_DATA_DIR='gs://b/tf ds'" in run and "export A='1 2'" in run
  assert '"$HOME"/contrastive_jax_logs/r1' in run and '"$LOGS/worker-$WORKER.log"' in run
  assert "gsutil" not in run  # no --log_dir
  words = shlex.split(run)
  i = words.index("--distributed=true")
  assert words[i - 3:i] == ["python3", "-m", "contrastive_jax.train"]
  assert words[i + 1:i + 1 + len(TRAIN)] == TRAIN  # the hostile argument round-trips intact
  assert words[i + 1 + len(TRAIN)] == "2>&1"


def test_plan_create_queued_spot_delete_git():
  args = tpu_pod.parse_args(BASE + [
      "--create", "--accelerator_type", "v4-32", "--queued", "--spot", "--delete",
      "--git_url", "https://example.com/a b.git", "--git_rev", "abc123", "--skip_setup",
      "--log_dir", "gs://b/logs/", "--", *TRAIN])
  cmds = tpu_pod.plan(args)
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert cmds[:3] == [
      qr + ["create", "pod1", *LOC, "--node-id=pod1", "--accelerator-type=v4-32",
            "--runtime-version=tpu-ubuntu2204-base", "--spot"],
      qr + ["describe", "pod1", *LOC, "--format=value(state.state)"],
      _ssh('set -e; rm -rf "$HOME"/contrastive_jax; git clone -q \'https://example.com/a b.git\' '
           '"$HOME"/contrastive_jax; git -C "$HOME"/contrastive_jax checkout -q abc123'),
  ]
  assert cmds[4] == qr + ["delete", "pod1", *LOC, "--quiet", "--force"]
  assert len(cmds) == 5  # no setup step
  run = _remote(cmds[3])
  assert "gsutil -q cp \"$LOG\" gs://b/logs/r1/ ||" in run
  assert run.endswith('exit "$status"')
  words = shlex.split(run)
  assert HOSTILE in words and words[words.index(HOSTILE) - 1] == "gs://b/run 1"


def test_plan_plain_create_and_delete():
  args = tpu_pod.parse_args(BASE + ["--create", "--accelerator_type", "v5litepod-16", "--delete",
                                    "--skip_copy", "--skip_setup", "--", "--workdir", "w"])
  cmds = tpu_pod.plan(args)
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert cmds[0] == vm + ["create", "pod1", *LOC, "--accelerator-type=v5litepod-16",
                          "--version=v2-alpha-tpuv5-lite"]
  assert cmds[2] == vm + ["delete", "pod1", *LOC, "--quiet"]
  assert len(cmds) == 3


def _fake_bin(tmp_path, name, body):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(f"#!{sys.executable}\n{body}")
  path.chmod(0o755)
  return path


RECORD = """import json, os, sys
with open(os.environ['RECORD'], 'a') as f:
  f.write(json.dumps({'prog': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:],
                      'cwd': os.getcwd(), 'tfds': os.environ.get('TFDS_DATA_DIR'),
                      'a': os.environ.get('A')}) + '\\n')
"""


def test_remote_run_command_in_bash(tmp_path):
  """Runs the ssh step's remote shell locally: argv, env, log, log copy and exit status."""
  home = tmp_path / "home"
  (home / "contrastive_jax").mkdir(parents=True)
  _fake_bin(tmp_path, "python3", RECORD + "print('training output'); sys.exit(7)\n")
  _fake_bin(tmp_path, "gsutil", RECORD)
  _fake_bin(tmp_path, "curl", "print(2)\n")  # the agent-worker-number metadata answer
  args = tpu_pod.parse_args(BASE + ["--tfds_data_dir", "gs://b/tf ds", "--env", "A=$(x) y",
                                    "--log_dir", "gs://b/logs", "--", *TRAIN])
  record = tmp_path / "record.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "TPU_WORKER_ID"}
  env.update(HOME=str(home), RECORD=str(record), PATH=f"{tmp_path / 'bin'}:{env['PATH']}")
  result = subprocess.run(["bash", "-c", _remote(tpu_pod.plan(args)[-1])], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 7, result.stderr  # the trainer's status, through tee
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  assert [c["prog"] for c in calls] == ["python3", "gsutil"]
  assert calls[0]["argv"] == ["-m", "contrastive_jax.train", "--distributed=true", *TRAIN]
  assert calls[0]["cwd"] == str(home / "contrastive_jax")
  assert calls[0]["tfds"] == "gs://b/tf ds" and calls[0]["a"] == "$(x) y"
  log = home / "contrastive_jax_logs" / "r1" / "worker-2.log"
  assert log.read_text() == "training output\n"
  assert calls[1]["argv"] == ["-q", "cp", str(log), "gs://b/logs/r1/"]
  assert "worker 2" in result.stdout


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_pack_and_untar(tmp_path):
  """The tarball holds the checkout as on disk; the untar step replaces the remote code dir."""
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  for name, text in [("pkg/a.py", "a"), ("gone.py", "g"), (".gitignore", "*.log\n")]:
    (repo / name).write_text(text)
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
  (repo / "pkg/a.py").write_text("a edited")
  (repo / "new.py").write_text("n")
  (repo / "out.log").write_text("ignored")
  (repo / "gone.py").unlink()
  home = tmp_path / "home"
  (home / "contrastive_jax").mkdir(parents=True)
  (home / "contrastive_jax" / "stale.py").write_text("old")
  names = tpu_pod.pack(str(repo), str(home / "contrastive_jax_code.tar.gz"))
  assert names == [".gitignore", "new.py", "pkg/a.py"]
  with tarfile.open(home / "contrastive_jax_code.tar.gz") as tar:
    assert sorted(tar.getnames()) == names
  args = tpu_pod.parse_args(BASE + ["--skip_setup", "--", "--workdir", "w"])
  untar = _remote(tpu_pod.plan(args)[2])
  subprocess.run(["bash", "-c", untar], env=dict(os.environ, HOME=str(home)), check=True)
  code = home / "contrastive_jax"
  assert sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file()) == names
  assert (code / "pkg/a.py").read_text() == "a edited"


def _dry_run(argv):
  return subprocess.run([sys.executable, str(TPU_POD), *argv], cwd=REPO, capture_output=True,
                        text=True, timeout=60)


def test_dry_run_prints_plan():
  argv = BASE + ["--create", "--accelerator_type", "v4-32", "--queued", "--delete",
                 "--env", "K=v w", "--dry-run", "--", *TRAIN]
  result = _dry_run(argv)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert all(line.startswith("+ ") for line in lines)
  assert [shlex.split(line[2:]) for line in lines] == tpu_pod.plan(tpu_pod.parse_args(argv))


@pytest.mark.parametrize("argv, message", [
    (BASE[2:] + ["--", "--workdir", "w"], "--tpu"),
    (BASE + ["--create", "--", "--workdir", "w"], "--accelerator_type"),
    (BASE + ["--", "--workdir", "w", "--dry-run"], "--dry-run after '--'"),
    (BASE + ["--git_url", "u", "--", "--workdir", "w"], "--git_rev"),
    (BASE + ["--env", "1A=b", "--", "--workdir", "w"], "KEY=VALUE"),
    (BASE, "no training arguments"),
])
def test_bad_flags_exit_with_message(argv, message):
  result = _dry_run(argv)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ""


def test_execute_polls_and_deletes_after_failure(monkeypatch, capsys):
  """Queued resource polled to ACTIVE; the failing run step stops the plan; delete still runs."""
  args = tpu_pod.parse_args(BASE + ["--create", "--accelerator_type", "v4-32", "--queued",
                                    "--delete", "--skip_copy", "--poll_s", "0", "--", "--x"])
  cmds = tpu_pod.plan(args)
  states = iter(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  ran = []

  def fake_run(cmd, **kwargs):
    ran.append(cmd)
    if "describe" in cmd:
      return subprocess.CompletedProcess(cmd, 0, stdout=next(states) + "\n")
    return subprocess.CompletedProcess(cmd, 5 if "--command" in cmd else 0)

  monkeypatch.setattr(tpu_pod.subprocess, "run", fake_run)
  assert tpu_pod.execute(args, cmds) == 5
  create, describe, setup, run, delete = cmds
  assert ran == [create, describe, describe, describe, setup, delete]  # run step not reached
  assert "state: PROVISIONING" in capsys.readouterr().out
  ran.clear()
  states = iter(["FAILED"])
  assert tpu_pod.execute(args, cmds) == 1
  assert ran == [create, describe, delete]


# --------------------------------------------------------------------------- SLURM

FAKE_PYTHON = """import json, os, sys, time
pid = os.environ['SLURM_PROCID']
keys = ['SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NODEID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST',
        'JAX_LOCAL_DEVICE_IDS', 'TFDS_DATA_DIR']
record = os.path.join(os.environ['RECORD_DIR'], f'task-{pid}.json')
with open(record + '.tmp', 'w') as f:
  json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {k: os.environ.get(k) for k in keys}},
            f)
os.rename(record + '.tmp', record)  # complete records only
print(f'task {pid} ran', flush=True)
if os.environ.get('FAKE_FAIL_PROCID') == pid:
  deadline = time.time() + 20  # fail once every task has started, so all are recorded
  while (sum(n.endswith('.json') for n in os.listdir(os.environ['RECORD_DIR']))
         < int(os.environ['SLURM_NTASKS'])
         and time.time() < deadline):
    time.sleep(0.01)
  sys.exit(int(os.environ.get('FAKE_FAIL_STATUS', '3')))
time.sleep(float(os.environ.get('FAKE_SLEEP', '0')))
"""
SLURM_ARGS = ["--config", "X", "--workdir", "dir with space"]


def _sbatch(tmp_path, **env_overrides):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  srun = bin_dir / "srun"
  srun.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {FAKE_SRUN} "$@"\n')
  srun.chmod(0o755)
  scontrol = bin_dir / "scontrol"  # records its arguments
  scontrol.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(tmp_path / "scontrol.log"))}\n')
  scontrol.chmod(0o755)
  python = _fake_bin(tmp_path, "fake_python", FAKE_PYTHON)
  records = tmp_path / "records"
  records.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(python), RECORD_DIR=str(records),
             SLURM_JOB_ID="4321", SLURM_JOB_NAME="cj", SLURM_JOB_NUM_NODES="2",
             SLURM_SUBMIT_DIR=str(tmp_path), TFDS_DATA_DIR="/data/tfds x",
             LOG_DIR=str(tmp_path / "logs"), FAKE_SRUN_LOG=str(tmp_path / "srun.jsonl"),
             CONTRASTIVE_JAX_DIR="")
  env.update(env_overrides)
  start = time.monotonic()
  result = subprocess.run(["bash", str(SBATCH), *SLURM_ARGS], env=env, capture_output=True,
                          text=True, timeout=60)
  tasks = [json.loads(p.read_text()) for p in sorted(records.glob("task-*.json"))]
  srun_argv = [json.loads(line)["argv"] for line in (tmp_path / "srun.jsonl").read_text()
               .splitlines()] if (tmp_path / "srun.jsonl").exists() else []
  return result, sorted(tasks, key=lambda t: int(t["env"]["SLURM_PROCID"])), srun_argv, \
      time.monotonic() - start


def test_slurm_process_per_gpu(tmp_path):
  result, tasks, srun_argv, _ = _sbatch(tmp_path, SLURM_GPUS_ON_NODE="4",
                                        JAX_LOCAL_DEVICE_IDS="9")
  assert result.returncode == 0, result.stderr
  assert len(srun_argv) == 1 and "--kill-on-bad-exit=1" in srun_argv[0]
  assert "--ntasks-per-node=4" in srun_argv[0] and "--ntasks=8" in srun_argv[0]
  assert [t["env"]["SLURM_PROCID"] for t in tasks] == [str(i) for i in range(8)]
  assert [t["env"]["SLURM_LOCALID"] for t in tasks] == [str(i % 4) for i in range(8)]
  for t in tasks:
    assert t["argv"] == ["-m", "contrastive_jax.train", *SLURM_ARGS]
    assert t["cwd"] == str(REPO)  # submit dir has no code: the script's parent
    assert t["env"]["SLURM_NTASKS"] == "8" and t["env"]["JAX_LOCAL_DEVICE_IDS"] is None
    assert t["env"]["TFDS_DATA_DIR"] == "/data/tfds x"
  assert (tmp_path / "logs" / "cj-4321-7.log").read_text() == "task 7 ran\n"


def test_slurm_process_per_node(tmp_path):
  result, tasks, srun_argv, _ = _sbatch(tmp_path, PROCESS_PER="node",
                                        SLURM_GPUS_PER_NODE="h100:4",
                                        SLURM_SUBMIT_DIR=str(REPO))
  assert result.returncode == 0, result.stderr
  assert "--ntasks-per-node=1" in srun_argv[0] and "--ntasks=2" in srun_argv[0]
  assert [t["env"]["SLURM_NODEID"] for t in tasks] == ["0", "1"]
  for t in tasks:
    assert t["argv"][-len(SLURM_ARGS):] == SLURM_ARGS and t["cwd"] == str(REPO)
    assert t["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3" and t["env"]["SLURM_NTASKS"] == "2"


def test_slurm_failing_task_fails_the_job(tmp_path):
  result, tasks, _, elapsed = _sbatch(tmp_path, SLURM_GPUS_ON_NODE="2", FAKE_FAIL_PROCID="1",
                                      FAKE_SLEEP="60")
  assert result.returncode == 3, result.stderr
  assert len(tasks) == 4
  assert elapsed < 30  # --kill-on-bad-exit ended the sleeping tasks
  assert "srun exited with status 3" in result.stdout


def test_slurm_preempted_job_requeues_itself(tmp_path):
  """Exit status 75 (the trainer was preempted and wrote its checkpoint) requeues the job."""
  result, _, _, _ = _sbatch(tmp_path, SLURM_GPUS_ON_NODE="1", FAKE_FAIL_PROCID="0",
                            FAKE_FAIL_STATUS="75")
  assert result.returncode == 75, result.stderr
  assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4321"]
  other = tmp_path / "other"
  other.mkdir()
  result, _, _, _ = _sbatch(other, SLURM_GPUS_ON_NODE="1", FAKE_FAIL_PROCID="0")
  assert result.returncode == 3 and not (other / "scontrol.log").exists()


def test_slurm_bad_mode(tmp_path):
  result, tasks, _, _ = _sbatch(tmp_path, SLURM_GPUS_ON_NODE="2", PROCESS_PER="socket")
  assert result.returncode == 2 and "PROCESS_PER" in result.stderr and not tasks

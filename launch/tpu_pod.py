#!/usr/bin/env python3
"""Train on every worker of a Cloud TPU VM pod slice with one command (stdlib only).

  python launch/tpu_pod.py --tpu my-v4 --zone us-central2-b --project my-project \\
    --create --accelerator_type v4-32 --queued --spot --delete \\
    --tfds_data_dir gs://my-bucket/tfds --log_dir gs://my-bucket/logs -- \\
    --config 'configs/clip_shards.py:data=gs://my-bucket/cc3m/*.tfrecord' \\
    --workdir gs://my-bucket/runs/clip1

Everything after ``--`` is passed to ``python -m contrastive_jax.train --distributed=true``
(JAX finds the pod's other workers from the TPU metadata). The steps, in order, each one
command (``--dry-run`` prints them as ``+ CMD`` lines and runs none):

1. ``--create``: ``gcloud compute tpus tpu-vm create`` or, with ``--queued``,
   ``gcloud compute tpus queued-resources create`` and then ``... describe`` polled until the
   request is ACTIVE (FAILED or SUSPENDED is an error).
2. Code on every worker, in ``~/contrastive_jax`` (replaced each run): by default a tarball of
   this checkout as it is on disk (tracked and untracked-but-not-ignored files, so local edits
   travel; made by ``tpu_pod.py --pack TARBALL``), copied with ``tpu-vm scp --worker=all`` and
   unpacked; with ``--git_url URL --git_rev REV`` a clone of URL at REV instead.
   ``--skip_copy`` keeps the code already there.
3. Setup (``--skip_setup`` skips it): a virtual environment ``~/contrastive_jax_venv`` made with
   a Python >= 3.11 (JAX needs it; the Ubuntu 22.04 TPU images ship 3.10, so ``python3.11`` is
   installed with apt unless ``--python`` names an interpreter), then
   ``pip install -U "jax[tpu]"`` (``--jax_version`` pins it), ``pip install -r requirements.txt``
   and tensorflow-text without dependencies (as ``.ci/run`` does).
4. Training: ONE ``gcloud compute tpus tpu-vm ssh --worker=all --command CMD``. On each worker
   CMD activates the venv, exports ``TFDS_DATA_DIR`` and every ``--env KEY=VALUE``, prints the
   host name and worker id, runs the trainer with its output tee'd to
   ``~/contrastive_jax_logs/<run_name>/worker-<id>.log``, copies that log to
   ``<log_dir>/<run_name>/`` with ``gsutil cp`` when ``--log_dir`` is given, and exits with the
   trainer's status (``set -o pipefail``). The worker id is ``$TPU_WORKER_ID`` if set, else the
   VM's ``agent-worker-number`` metadata attribute (what every TPU VM worker has), else the host
   name.
5. ``--delete``: ``gcloud compute tpus tpu-vm delete`` (``queued-resources delete --force`` with
   ``--queued``), run in a ``finally``: also when an earlier step failed or was interrupted.

Resume: re-run the same command; the trainer continues from the newest checkpoint in its
workdir (use a gs:// workdir so that it outlives the TPU VM).

Default ``--version`` (TPU software) by ``--accelerator_type``: v6e -> ``v2-alpha-tpuv6e``,
v5p -> ``v2-alpha-tpuv5``, v5litepod/v5e -> ``v2-alpha-tpuv5-lite``, v4 and older ->
``tpu-ubuntu2204-base``.

Every user value that enters a remote shell command goes through ``shlex.quote``; local commands
are argv lists run without a shell. :func:`plan` builds the command list for both the real run
and ``--dry-run``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Remote paths, relative to $HOME on every worker.
CODE_DIR = "contrastive_jax"
VENV_DIR = "contrastive_jax_venv"
LOGS_DIR = "contrastive_jax_logs"
REMOTE_TARBALL = "contrastive_jax_code.tar.gz"
# tensorflow-text is installed without its dependencies (its wheel would pull the full
# `tensorflow` next to tensorflow-cpu); same pin as .ci/run.
TF_TEXT = "tensorflow-text==2.21.1"
METADATA_WORKER = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
                   "agent-worker-number")
DEFAULT_VERSIONS = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"),
                    ("v5litepod", "v2-alpha-tpuv5-lite"), ("v5e", "v2-alpha-tpuv5-lite"))
FALLBACK_VERSION = "tpu-ubuntu2204-base"
FAILED_STATES = ("FAILED", "SUSPENDED")


def default_version(accelerator_type: str) -> str:
  """The TPU software version for an accelerator type such as ``v4-32`` or ``v5litepod-16``."""
  for prefix, version in DEFAULT_VERSIONS:
    if accelerator_type.startswith(prefix):
      return version
  return FALLBACK_VERSION


def home(path: str) -> str:
  """A remote shell word for ``$HOME/<path>`` (the path part quoted)."""
  return '"$HOME"/' + shlex.quote(path)


def _gcloud_tpu(args, *words) -> list[str]:
  return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}",
          f"--project={args.project}"]


def ssh(args, command: str) -> list[str]:
  """``gcloud ... tpu-vm ssh`` running the remote shell ``command`` on all workers."""
  return _gcloud_tpu(args, "tpu-vm", "ssh", args.tpu) + ["--worker=all", "--command", command]


def local_tarball(args) -> str:
  return os.path.join(tempfile.gettempdir(), f"contrastive_jax-{args.run_name}.tar.gz")


def setup_command(args) -> str:
  """Remote shell: venv with Python >= 3.11, JAX for TPU and the requirements."""
  venv = home(VENV_DIR)
  if args.python:
    pick = f"PY={shlex.quote(args.python)}"
  else:
    pick = ("if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=python3; "
            "else sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update; "
            "sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 "
            "python3.11-venv; PY=python3.11; fi")
  jax = "jax[tpu]" + (f"=={args.jax_version}" if args.jax_version else "")
  return "; ".join([
      "set -e", f"cd {home(CODE_DIR)}", pick,
      f'[ -x {venv}/bin/python ] || "$PY" -m venv {venv}', f". {venv}/bin/activate",
      "python -m pip install -q -U pip", f"python -m pip install -q -U {shlex.quote(jax)}",
      "python -m pip install -q -r requirements.txt",
      f"python -m pip install -q --no-deps {shlex.quote(TF_TEXT)}"])


def run_command(args) -> str:
  """Remote shell run on every worker: the trainer, tee'd to a per-worker log."""
  logs = home(f"{LOGS_DIR}/{args.run_name}")
  venv = home(VENV_DIR)
  lines = ["set -o pipefail", f"cd {home(CODE_DIR)} || exit 1",
           f"if [ -f {venv}/bin/activate ]; then . {venv}/bin/activate; fi",
           "export PYTHONUNBUFFERED=1"]
  if args.tfds_data_dir:
    lines.append(f"export TFDS_DATA_DIR={shlex.quote(args.tfds_data_dir)}")
  for key, value in args.env:
    lines.append(f"export {key}={shlex.quote(value)}")
  lines += [
      f'WORKER="${{TPU_WORKER_ID:-$(curl -sf -H \'Metadata-Flavor: Google\' {METADATA_WORKER} '
      '|| hostname)}"',
      f"LOGS={logs}", 'mkdir -p "$LOGS"', 'LOG="$LOGS/worker-$WORKER.log"',
      'echo "[tpu_pod] host $(hostname) worker $WORKER log $LOG"',
      shlex.join(["python3", "-m", "contrastive_jax.train", "--distributed=true",
                  *args.train_args]) + ' 2>&1 | tee "$LOG"',
      "status=$?",
      'echo "[tpu_pod] worker $WORKER exit status $status"']
  if args.log_dir:
    dest = f"{args.log_dir.rstrip('/')}/{args.run_name}/"
    lines.append(f'gsutil -q cp "$LOG" {shlex.quote(dest)} || '
                 'echo "[tpu_pod] warning: log copy failed"')
  lines.append('exit "$status"')
  return "; ".join(lines)


def plan(args) -> list[list[str]]:
  """Every command of a launch, in order, as argv lists (the last one deletes with --delete).

  Args:
    args: the parsed flags (see :func:`parse_args`), ``train_args`` the list after ``--``.

  Returns:
    The commands; a ``queued-resources describe`` one is polled until ACTIVE by the runner.
  """
  qr = args.queued_resource or args.tpu
  version = args.version or default_version(args.accelerator_type or "")
  spot = ["--spot"] if args.spot else []
  cmds = []
  if args.create:
    if args.queued:
      cmds.append(_gcloud_tpu(args, "queued-resources", "create", qr)
                  + [f"--node-id={args.tpu}", f"--accelerator-type={args.accelerator_type}",
                     f"--runtime-version={version}", *spot])
      cmds.append(_gcloud_tpu(args, "queued-resources", "describe", qr)
                  + ["--format=value(state.state)"])
    else:
      cmds.append(_gcloud_tpu(args, "tpu-vm", "create", args.tpu)
                  + [f"--accelerator-type={args.accelerator_type}", f"--version={version}",
                     *spot])
  code = home(CODE_DIR)
  if args.skip_copy:
    pass
  elif args.git_url:
    cmds.append(ssh(args, "; ".join([
        "set -e", f"rm -rf {code}", f"git clone -q {shlex.quote(args.git_url)} {code}",
        f"git -C {code} checkout -q {shlex.quote(args.git_rev)}"])))
  else:
    tarball = local_tarball(args)
    cmds.append([sys.executable, os.path.abspath(__file__), "--pack", tarball])
    cmds.append(_gcloud_tpu(args, "tpu-vm", "scp", tarball, f"{args.tpu}:{REMOTE_TARBALL}")
                + ["--worker=all"])
    cmds.append(ssh(args, "; ".join([
        "set -e", f"rm -rf {code}", f"mkdir -p {code}",
        f"tar -xzf {home(REMOTE_TARBALL)} -C {code}"])))
  if not args.skip_setup:
    cmds.append(ssh(args, setup_command(args)))
  cmds.append(ssh(args, run_command(args)))
  if args.delete:
    if args.queued:
      cmds.append(_gcloud_tpu(args, "queued-resources", "delete", qr) + ["--quiet", "--force"])
    else:
      cmds.append(_gcloud_tpu(args, "tpu-vm", "delete", args.tpu) + ["--quiet"])
  return cmds


def pack(repo: str, tarball: str) -> list[str]:
  """Writes ``repo``'s tracked and untracked-not-ignored files (as on disk) to a .tar.gz.

  Returns:
    The archived paths, relative to ``repo``.
  """
  out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "-co", "--exclude-standard"],
                       check=True, capture_output=True).stdout.decode()
  names = sorted({n for n in out.split("\0") if n and os.path.isfile(os.path.join(repo, n))})
  with tarfile.open(tarball, "w:gz") as tar:
    for name in names:
      tar.add(os.path.join(repo, name), arcname=name, recursive=False)
  return names


def _env_pair(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
    raise argparse.ArgumentTypeError(f"--env needs KEY=VALUE with KEY a variable name: {text!r}")
  return key, value


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/tpu_pod.py", formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s --tpu NAME --zone ZONE --project PROJECT [options] -- TRAIN_ARGS...",
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--tpu", required=True, help="TPU VM (node) name.")
  p.add_argument("--zone", required=True, help="Zone, e.g. us-central2-b.")
  p.add_argument("--project", required=True, help="Google Cloud project id.")
  g = p.add_argument_group("create / delete")
  g.add_argument("--create", action="store_true", help="Create the TPU VM first.")
  g.add_argument("--accelerator_type", help="With --create: v4-32, v5litepod-16, v6e-16, ...")
  g.add_argument("--version", help="TPU software version (default: by accelerator type, above).")
  g.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")
  g.add_argument("--queued", action="store_true",
                 help="Create through a queued resource and wait until it is ACTIVE.")
  g.add_argument("--queued_resource", help="Queued resource id (default: the --tpu name).")
  g.add_argument("--poll_s", type=float, default=30.0,
                 help="Seconds between queued-resource state checks.")
  g.add_argument("--delete", action="store_true",
                 help="Delete the TPU VM (and queued resource) at the end, also on failure.")
  g = p.add_argument_group("code and setup")
  g.add_argument("--git_url", help="Clone this repository on the workers instead of copying.")
  g.add_argument("--git_rev", help="Revision to check out (with --git_url).")
  g.add_argument("--skip_copy", action="store_true", help="Keep ~/contrastive_jax as it is.")
  g.add_argument("--skip_setup", action="store_true", help="No venv / pip step.")
  g.add_argument("--jax_version", help="Pin jax[tpu]==VERSION (default: newest).")
  g.add_argument("--python", default="",
                 help="Interpreter (>= 3.11) to make the venv with (default: python3 if new "
                      "enough, else python3.11 from apt).")
  g = p.add_argument_group("run")
  g.add_argument("--tfds_data_dir", help="TFDS_DATA_DIR on the workers (typically gs://).")
  g.add_argument("--env", action="append", type=_env_pair, default=[], metavar="KEY=VALUE",
                 help="Extra environment variable for the trainer (repeatable).")
  g.add_argument("--run_name", default=None,
                 help="Names the log folder (default: local time YYYYmmdd-HHMMSS).")
  g.add_argument("--log_dir", help="Copy each worker's log to LOG_DIR/RUN_NAME/ (gs://...).")
  g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print the commands (one per line, '+ ' prefixed) and run none.")
  return p


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses ``LAUNCHER_FLAGS -- TRAIN_ARGS``; exits with a message naming what is wrong."""
  p = parser()
  if "--" in argv:
    i = argv.index("--")
    own, train_args = argv[:i], argv[i + 1:]
  else:
    own, train_args = argv, []
  args = p.parse_args(own)
  args.train_args = train_args
  if not train_args:
    p.error("no training arguments: put them after '--', e.g. "
            "-- --config configs/clip_shards.py:data=... --workdir gs://bucket/run")
  misplaced = {"--dry-run", "--dry_run", "--delete", "--create"} & set(train_args)
  if misplaced:
    p.error(f"{', '.join(sorted(misplaced))} after '--' would go to the trainer: put launcher "
            "flags before '--'")
  if args.create and not args.accelerator_type:
    p.error("--create needs --accelerator_type (e.g. v4-32)")
  if bool(args.git_url) != bool(args.git_rev):
    p.error("--git_url and --git_rev go together")
  for name in ("git_url", "git_rev", "tpu", "queued_resource"):
    value = getattr(args, name)
    if value is not None and (not value or value.startswith("-")):
      p.error(f"--{name} must be non-empty and must not start with '-': {value!r}")
  if args.run_name is None:
    args.run_name = time.strftime("%Y%m%d-%H%M%S")
  if not args.run_name or "/" in args.run_name or args.run_name in (".", ".."):
    p.error(f"--run_name must be a plain name: {args.run_name!r}")
  return args


def _is_poll(cmd: list[str]) -> bool:
  return cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]


def _wait_active(cmd: list[str], poll_s: float) -> None:
  last = None
  while True:
    state = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    if state != last:
      print(f"[tpu_pod] queued resource state: {state or '?'}", flush=True)
      last = state
    if state == "ACTIVE":
      return
    if state in FAILED_STATES:
      raise RuntimeError(f"queued resource is {state}; see `{shlex.join(cmd[:6])}`")
    time.sleep(poll_s)


def execute(args, cmds: list[list[str]]) -> int:
  """Runs ``cmds`` in order; with --delete the last one always runs. Returns the exit code."""
  body, cleanup = (cmds[:-1], cmds[-1:]) if args.delete else (cmds, [])
  code = 0
  try:
    for cmd in body:
      print("+ " + shlex.join(cmd), flush=True)
      if _is_poll(cmd):
        _wait_active(cmd, args.poll_s)
        continue
      rc = subprocess.run(cmd).returncode
      if rc:
        print(f"[tpu_pod] command failed with exit status {rc}: {shlex.join(cmd[:6])} ...",
              file=sys.stderr, flush=True)
        code = rc
        break
  except (RuntimeError, subprocess.CalledProcessError) as e:
    print(f"[tpu_pod] error: {e}", file=sys.stderr, flush=True)
    code = 1
  finally:
    for cmd in cleanup:
      print("+ " + shlex.join(cmd), flush=True)
      if subprocess.run(cmd).returncode:
        print("[tpu_pod] warning: delete failed; check `gcloud compute tpus tpu-vm list` and "
              "`gcloud compute tpus queued-resources list`", file=sys.stderr, flush=True)
    tarball = local_tarball(args)
    if os.path.exists(tarball):
      os.remove(tarball)
  return code


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--pack"]:
    if len(argv) != 2:
      print("usage: tpu_pod.py --pack TARBALL", file=sys.stderr)
      return 2
    names = pack(REPO, argv[1])
    print(f"[tpu_pod] packed {len(names)} files of {REPO} into {argv[1]}", flush=True)
    return 0
  args = parse_args(argv)
  cmds = plan(args)
  if args.dry_run:
    for cmd in cmds:
      print("+ " + shlex.join(cmd))
    return 0
  return execute(args, cmds)


if __name__ == "__main__":
  sys.exit(main())

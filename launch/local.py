#!/usr/bin/env python3
"""Runs one command as N JAX processes on this machine, joined by ``jax.distributed``.

  python launch/local.py --processes 2 --devices_per_process 4 --log_dir /tmp/logs -- \\
      python -m contrastive_jax.train --config configs/clip_shapes.py:size=tiny \\
      --workdir /tmp/clip_2proc

Every process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (the trainer's ``--distributed=auto`` joins on them), CPU devices
(``JAX_PLATFORMS=cpu``) and ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. This
is how the multi-host path is tested on one machine; on real clusters use ``tpu_pod.py`` or
``slurm_train.sbatch``.

Output: every line of process ``i`` is echoed as ``[i] line`` and, with ``--log_dir``, written
to ``LOG_DIR/process-i.log`` (its pid to ``process-i.pid``). When a process fails, the others
are given ``--grace_s`` seconds to fail on their own (JAX's heartbeat timeout ends processes
whose peer died), then terminated. The exit status is the first failing process's (a signal
``S`` counts as ``128 + S``), or 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, index: int, count: int, port: int, devices: int) -> dict:
  """The environment of process ``index`` of ``count``."""
  env = dict(base)
  flags = re.sub(rf"{DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} {DEVICE_FLAG}={devices}".strip())
  return env


def _exit_status(code: int) -> int:
  return 128 - code if code < 0 else code


def _pump(index: int, stream, log_path: Optional[str]) -> None:
  log = open(log_path, "w", encoding="utf-8") if log_path else None
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"[{index}] {line}")
    sys.stdout.flush()
    if log:
      log.write(line)
      log.flush()
  if log:
    log.close()


def launch(command: List[str], *, processes: int, devices_per_process: int, port: int = 0,
           log_dir: Optional[str] = None, grace_s: float = 120.0) -> int:
  """Runs ``command`` as ``processes`` JAX processes; returns the exit status (see module)."""
  port = port or free_port()
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  print(f"[launch] {processes} processes x {devices_per_process} CPU devices, coordinator "
        f"127.0.0.1:{port}", flush=True)
  procs, pumps = [], []
  for i in range(processes):
    env = process_env(os.environ, index=i, count=processes, port=port,
                      devices=devices_per_process)
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1, errors="replace")
    procs.append(p)
    if log_dir:
      with open(os.path.join(log_dir, f"process-{i}.pid"), "w") as f:
        f.write(f"{p.pid}\n")
    t = threading.Thread(target=_pump, daemon=True, args=(
        i, p.stdout, os.path.join(log_dir, f"process-{i}.log") if log_dir else None))
    t.start()
    pumps.append(t)

  def terminate(signum=None, frame=None):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    if signum is not None:
      print(f"[launch] signal {signum}: terminating the processes", flush=True)

  previous = signal.signal(signal.SIGTERM, terminate)
  status, deadline = 0, None
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code not in (None, 0) and status == 0:
          status = _exit_status(code)
          deadline = time.monotonic() + grace_s
          print(f"[launch] process {i} failed with status {status}; waiting up to {grace_s:.0f}"
                " s for the others to stop", flush=True)
      if deadline is not None and time.monotonic() > deadline:
        print("[launch] grace period over: terminating the remaining processes", flush=True)
        terminate()
        deadline = time.monotonic() + 10
        for p in procs:
          try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
          except subprocess.TimeoutExpired:
            p.kill()
      time.sleep(0.2)
  except KeyboardInterrupt:
    terminate(signal.SIGINT)
    for p in procs:
      p.wait()
  finally:
    signal.signal(signal.SIGTERM, previous)
  for t in pumps:
    t.join(timeout=5)
  for i, p in enumerate(procs):
    code = _exit_status(p.returncode)
    print(f"[launch] process {i} exited with status {code}", flush=True)
    if status == 0 and code:
      status = code
  return status


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [options] -- COMMAND [ARGS...]")
  parser.add_argument("--processes", type=int, default=2, help="number of JAX processes")
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="simulated CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--log_dir", help="write process-I.log and process-I.pid here")
  parser.add_argument("--grace_s", type=float, default=120.0,
                      help="after one process fails, seconds the others get to stop by themselves")
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    parser.error("give the command after --, e.g. -- python -m contrastive_jax.train ...")
  split = argv.index("--")
  args, command = parser.parse_args(argv[:split]), argv[split + 1:]
  if not command:
    parser.error("empty command after --")
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error("--processes and --devices_per_process must be at least 1")
  return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                port=args.port, log_dir=args.log_dir, grace_s=args.grace_s)


if __name__ == "__main__":
  sys.exit(main())

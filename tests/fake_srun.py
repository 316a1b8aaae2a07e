#!/usr/bin/env python3
"""A stand-in for SLURM's ``srun`` on one machine: runs every task of a job step locally.

  fake_srun.py [--nodes=N] [--ntasks=N] [--ntasks-per-node=N] [--output=PATTERN]
               [--kill-on-bad-exit=1] [other --options=..., ignored] COMMAND [ARGS...]

Spawns the step's tasks in parallel, each with the variables real ``srun`` gives a task
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NTASKS``, ``SLURM_STEP_NODELIST``,
``SLURM_STEP_NUM_NODES``, ...), so that JAX's SLURM auto-detection works (all "nodes" are this
host: ``SLURM_STEP_NODELIST`` defaults to ``localhost``), waits for all of them and exits with
the largest task exit status (a task killed by signal S counts as 128 + S). With
``--kill-on-bad-exit=1`` the first task to fail ends the others (SIGTERM, then SIGKILL after
5 s) and its status is the step's. Task count: ``--ntasks`` if given, else
nodes x ``--ntasks-per-node``, else ``$SLURM_NTASKS`` (else 1); nodes: ``--nodes``, else
``$SLURM_JOB_NUM_NODES`` (else 1); tasks are spread over nodes in blocks. ``--output`` takes
srun's ``%j %t %n %N %x %s %%`` patterns.
Options must be given as ``--name=value`` (or a bare ``--flag``).

Environment: ``FAKE_SRUN_LOG`` (optional file): one JSON line per call with srun's argv.
Use it as ``srun`` by putting a wrapper script named ``srun`` first on ``PATH`` that runs
``python3 tests/fake_srun.py "$@"`` (or link to this file: it is executable).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
  """Splits ``[--opt=value | --flag]... COMMAND ARGS...`` into options and the command."""
  opts = {}
  i = 0
  while i < len(argv) and argv[i].startswith("-"):
    if argv[i] == "--":
      i += 1
      break
    name, sep, value = argv[i].lstrip("-").partition("=")
    opts[name] = value if sep else "1"
    i += 1
  return opts, argv[i:]


def expand(pattern: str, env: dict[str, str], task: int, node: int) -> str:
  """srun's filename pattern: ``%j`` job id, ``%t`` task, ``%n`` node id, ``%N`` node name."""
  subs = {"j": env.get("SLURM_JOB_ID", "0"), "t": str(task), "n": str(node),
          "N": f"node{node}", "x": env.get("SLURM_JOB_NAME", "fake"), "s": "0", "%": "%"}
  out, i = [], 0
  while i < len(pattern):
    if pattern[i] == "%" and i + 1 < len(pattern) and pattern[i + 1] in subs:
      out.append(subs[pattern[i + 1]])
      i += 2
    else:
      out.append(pattern[i])
      i += 1
  return "".join(out)


def layout(opts: dict[str, str], env: dict[str, str]) -> tuple[int, list[tuple[int, int]]]:
  """Returns (number of nodes, [(node id, local id) of each task])."""
  nodes = int(opts.get("nodes") or env.get("SLURM_JOB_NUM_NODES") or 1)
  if "ntasks" in opts:
    ntasks = int(opts["ntasks"])
  elif "ntasks-per-node" in opts:
    ntasks = nodes * int(opts["ntasks-per-node"])
  else:
    ntasks = int(env.get("SLURM_NTASKS") or 1)
  per_node = int(opts.get("ntasks-per-node") or -(-ntasks // nodes))
  if per_node * nodes < ntasks:
    raise SystemExit(f"fake srun: {ntasks} tasks do not fit {nodes} nodes x {per_node}")
  return nodes, [(t // per_node, t % per_node) for t in range(ntasks)]


def main(argv: list[str]) -> int:
  opts, command = parse(argv)
  if not command:
    print("fake srun: no command", file=sys.stderr)
    return 2
  env = dict(os.environ)
  if env.get("FAKE_SRUN_LOG"):
    with open(env["FAKE_SRUN_LOG"], "a") as f:
      f.write(json.dumps({"argv": argv}) + "\n")
  nodes, tasks = layout(opts, env)
  nodelist = env.get("SLURM_JOB_NODELIST", "localhost")
  procs, files = [], []
  for task, (node, local) in enumerate(tasks):
    task_env = dict(env, SLURM_PROCID=str(task), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                    SLURM_NTASKS=str(len(tasks)), SLURM_NPROCS=str(len(tasks)),
                    SLURM_STEP_NUM_TASKS=str(len(tasks)), SLURM_STEP_NUM_NODES=str(nodes),
                    SLURM_STEP_NODELIST=nodelist, SLURM_STEP_ID="0", SLURM_STEPID="0")
    task_env.setdefault("SLURM_JOB_ID", "0")
    out = None
    if opts.get("output"):
      out = open(expand(opts["output"], env, task, node), "w")
      files.append(out)
    procs.append(subprocess.Popen(command, env=task_env, stdout=out,
                                  stderr=subprocess.STDOUT if out else None,
                                  start_new_session=True))
  kill = opts.get("kill-on-bad-exit", "0") not in ("0", "")
  codes: list[int | None] = [None] * len(procs)
  killed_at = None
  first_failure = 0
  try:
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        if codes[i] is None and p.poll() is not None:
          codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
          first_failure = first_failure or codes[i]
          if codes[i] and kill and killed_at is None:
            print(f"fake srun: task {i} exited with {codes[i]}: terminating the step",
                  file=sys.stderr, flush=True)
            killed_at = time.monotonic()
            _signal_all(procs, codes, signal.SIGTERM)
      if killed_at is not None and time.monotonic() - killed_at > 5:
        _signal_all(procs, codes, signal.SIGKILL)
      time.sleep(0.02)
  except KeyboardInterrupt:
    _signal_all(procs, codes, signal.SIGKILL)
    raise
  finally:
    for f in files:
      f.close()
  # After --kill-on-bad-exit the step's status is the failing task's, not the killed ones'.
  return first_failure if killed_at is not None else max(codes)


def _signal_all(procs, codes, sig) -> None:
  for p, c in zip(procs, codes):
    if c is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

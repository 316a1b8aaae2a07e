"""Every benchmark against its goal, in one command: results, plots and RESULTS.md.

  python benchmarks/run.py            # full sizes (about 15 min on a 2-core CPU)
  python benchmarks/run.py --quick    # small sizes, every code path (about 3 min)
  python benchmarks/run.py --parts loss_memory,step_overhead   # re-runs two parts, keeps the rest

Each part runs in its own Python subprocess with the environment it needs (8 simulated CPU
devices for the loss-memory and step-overhead parts, this machine's own devices for the
default run, the GPU part only when an accelerator is present), so one part's failure or
device setup cannot disturb another. A part that fails is reported with its error and makes
the command exit non-zero after the report is written.

Output (``--output_dir``, default ``benchmarks`` for full runs and
``/tmp/contrastive_jax_benchmarks_quick`` for ``--quick``): ``RESULTS.md``, the plots in
``plots/`` and every number in ``results/run.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIMULATED_DEVICES = 8
# With it, XLA's CPU temporaries stop costing page faults every step (see the open_clip part).
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

# part -> (module in benchmarks/, simulated CPU devices or None for the machine's own, title)
PARTS = {
    "loss_memory": ("loss_memory", SIMULATED_DEVICES, "Loss memory vs batch and devices"),
    "step_overhead": ("step_overhead", SIMULATED_DEVICES, "Train-step overhead"),
    "default_run": ("default_run", None, "Compile time and steps/s of the default run"),
    "input_pipeline": ("input_pipeline", SIMULATED_DEVICES, "Input pipeline"),
    "open_clip": ("open_clip_compare", None, "Side by side with open_clip"),
    "gpu": ("gpu_scale", None, "Accelerator: MFU and the largest batch"),
}


def part_env(devices) -> dict:
  """The environment of a part's subprocess: CPU with ``devices`` simulated devices, or the
  machine's own devices (``None``) with any simulated-device flag removed."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run_part_here(name: str, quick: bool) -> dict:
  """Runs one part in this process (the subprocess side)."""
  module = importlib.import_module(PARTS[name][0])
  if name == "open_clip":  # one thread each: the steadiest comparison on a shared machine
    result = module.run(quick=quick, threads=1)
    if "skipped" not in result and os.path.exists(JEMALLOC):
      result["jemalloc"] = module.run(quick=quick, threads=1, env={
          "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"})
    return result
  if name == "gpu":
    import jax
    if jax.default_backend() == "cpu" and not quick:
      return {"skipped": "no GPU or TPU: jax.default_backend() is 'cpu'; run this command "
                         "on an accelerator machine for MFU and the largest batch."}
  return module.run(quick=quick)


def run_part(name: str, quick: bool, timeout_s: float) -> dict:
  """Runs one part in a fresh subprocess; returns its result, ``{"error": ...}`` on failure."""
  devices = PARTS[name][1]
  command = [sys.executable, os.path.abspath(__file__), "--_part", name] + (
      ["--quick"] if quick else [])
  started = time.perf_counter()
  try:
    proc = subprocess.run(command, env=part_env(devices), capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s", "seconds": timeout_s}
  seconds = round(time.perf_counter() - started, 1)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    return {"error": f"exit status {proc.returncode}:\n{proc.stderr[-2500:]}",
            "seconds": seconds}
  result = json.loads(lines[-1][len("RESULT "):])
  result["seconds"] = seconds
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, every code path")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--output_dir", default=None)
  parser.add_argument("--timeout_s", type=float, default=1800, help="per part")
  parser.add_argument("--_part", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._part:  # subprocess side: one JSON line on stdout
    print("RESULT " + json.dumps(run_part_here(args._part, args.quick)), flush=True)
    return 0
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"--parts: unknown {unknown}; expected a subset of {list(PARTS)}")
  output_dir = args.output_dir or (
      "/tmp/contrastive_jax_benchmarks_quick" if args.quick else HERE)
  results = {}
  saved = os.path.join(output_dir, "results", "run.json")
  if set(parts) != set(PARTS) and os.path.exists(saved):  # a subset updates the last report
    with open(saved) as f:
      results = {k: v for k, v in json.load(f).items() if k in PARTS}
  for name in parts:
    print(f"[{name}] {PARTS[name][2]} ...", flush=True)
    results[name] = run_part(name, args.quick, args.timeout_s)
    status = ("error" if "error" in results[name] else
              "skipped" if "skipped" in results[name] else "done")
    print(f"[{name}] {status} in {results[name]['seconds']} s", flush=True)
    if status == "error":
      print(results[name]["error"], file=sys.stderr)
  sys.path.insert(0, HERE)
  import report
  path = report.write(results, output_dir, quick=args.quick)
  print(f"Wrote {path}")
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  sys.exit(main())

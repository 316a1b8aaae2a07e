"""Compile time and steps/s of the default shapes run, as a user runs it.

Runs ``python -m contrastive_jax.train --config configs/clip_shapes.py`` in a subprocess
(this machine's devices, no simulated ones; TensorFlow for tf.data, evaluation off) and reads
its ``metrics.jsonl``:

* ``first_step_s``: the trainer's first step, compilation included; the compile time is
  that minus one steady step;
* ``steps_per_sec``: clu's progress report at every ``log_every_steps``; the steady rate is
  the median of the reports after the first (which holds the compilation).

Goal: compile < 30 s on a CPU.

  python benchmarks/default_run.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_COMPILE_S = 30.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run(quick: bool = False, *, steps: int | None = None, workdir: str | None = None) -> dict:
  """Trains the default CLIP shapes config for ``steps`` steps and reads its timings."""
  size = "tiny" if quick else "cpu"
  steps = steps or (20 if quick else 200)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = workdir or os.path.join(tmp, "run")
    command = [sys.executable, "-m", "contrastive_jax.train",
               f"--config={REPO}/configs/clip_shapes.py:size={size},steps={steps},eval=0",
               f"--workdir={workdir}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=_clean_env(), capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if proc.returncode:
      raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
  first = next(r["first_step_s"] for r in records if "first_step_s" in r)
  rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
  steady = statistics.median(rates[1:] or rates)
  compile_s = first - 1.0 / steady
  return {"config": f"configs/clip_shapes.py:size={size}", "steps": steps,
          "first_step_s": round(first, 2), "compile_s": round(compile_s, 2),
          "steps_per_s": round(steady, 2), "steps_per_s_reports": [round(r, 2) for r in rates],
          "wall_s": round(wall_s, 1), "goal_compile_s": GOAL_COMPILE_S,
          "met": compile_s < GOAL_COMPILE_S}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  result = run(args.quick, steps=args.steps)
  print(json.dumps(result, indent=2))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

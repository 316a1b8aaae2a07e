"""Trains every objective with the same budget and compares them.

``--family image_text`` (default): the image-text objectives on the shapes data, below.
``--family image_only``: every ``configs/<method>_fashion_mnist.py`` through
``benchmarks/ssl_fashion_mnist.py`` (kNN and linear probe on Fashion-MNIST; the remaining
arguments go to that script). ``benchmarks/objectives_table.py`` joins both runs' JSON into the
README's table of every objective.

Each ``configs/<name>_shapes.py`` is trained from scratch for ``--steps`` steps (same data,
batch, model size and optimizer budget; each method keeps its own loss hyperparameters) and
evaluated with its own scoring. Prints a markdown table (zero-shot acc1, retrieval R@1 both
ways, training steps/s), writes JSON, and optionally replaces the table between the markers
``<!-- compare_objectives:start -->`` / ``<!-- compare_objectives:end -->`` of a README.

  python benchmarks/compare_objectives.py --steps 600 \\
      --output benchmarks/results/compare_objectives_cpu.json --readme README.md

Steps/s is the trainer's own measurement (median of its progress reports, evaluation and
compilation excluded) on the machine that ran the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OBJECTIVES = ("clip", "siglip", "filip", "protoclip", "dreamlip", "convirt", "slip", "cliprocket")
START, END = "<!-- compare_objectives:start -->", "<!-- compare_objectives:end -->"


def load_config(name: str, arg: str):
  path = REPO / "configs" / f"{name}_shapes.py"
  spec = importlib.util.spec_from_file_location(f"{name}_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def median_steps_per_sec(workdir: str) -> float:
  rates = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "steps_per_sec" in row:
        rates.append(row["steps_per_sec"])
  return statistics.median(rates) if rates else float("nan")


def run_one(name: str, size: str, steps: int, workdir: str) -> dict:
  from contrastive_jax import train
  config = load_config(name, f"size={size},steps={steps}")
  config.eval.every_steps = 0  # evaluate once, at the end
  start = time.time()
  results = train.train_and_evaluate(config, workdir)
  return {
      "objective": name,
      "steps": config.total_steps,
      "batch_size": config.batch_size,
      "zeroshot_acc1": results["zeroshot/shapes/acc1"],
      "i2t_recall@1": results["retrieval/shapes/i2t_recall@1"],
      "t2i_recall@1": results["retrieval/shapes/t2i_recall@1"],
      "steps_per_sec": median_steps_per_sec(workdir),
      "wall_seconds": time.time() - start,
      "scoring": config.eval.get("scoring", "pooled"),
  }


def markdown(rows, header: str) -> str:
  lines = [header, "",
           "| objective | zero-shot acc1 | I→T R@1 | T→I R@1 | steps/s | scoring |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['objective']} | {r['zeroshot_acc1']:.3f} | {r['i2t_recall@1']:.3f} | "
                 f"{r['t2i_recall@1']:.3f} | {r['steps_per_sec']:.2f} | {r['scoring']} |")
  return "\n".join(lines)


def replace_in_readme(readme: str, table: str, markers=(START, END)) -> None:
  """Replaces the text between the two ``markers`` of ``readme`` with ``table``."""
  start, end = markers
  text = pathlib.Path(readme).read_text()
  if start not in text or end not in text:
    raise ValueError(f"{readme} has no {start} ... {end} markers to replace.")
  block = f"{start}\n{table}\n{end}"
  text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
  pathlib.Path(readme).write_text(text)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--family" in argv:
    i = argv.index("--family")
    family = argv[i + 1] if i + 1 < len(argv) else ""
    del argv[i:i + 2]
    if family == "image_only":
      sys.path.insert(0, str(REPO / "benchmarks"))
      import ssl_fashion_mnist
      if not any(a.startswith("--methods") for a in argv):
        argv = ["--methods", ",".join(ssl_fashion_mnist.METHODS)] + argv
      return ssl_fashion_mnist.main(argv)
    if family != "image_text":
      raise SystemExit(f"--family {family!r}; expected image_text or image_only.")
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--family", default="image_text", choices=("image_text", "image_only"))
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("--size", default="cpu", choices=("cpu", "tiny"))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--workdir", default=None, help="parent of the runs' workdirs "
                      "(default: a fresh temporary directory; an existing run is resumed)")
  parser.add_argument("--output", default=None, help="JSON file for the rows")
  parser.add_argument("--readme", default=None, help="README whose table to replace")
  args = parser.parse_args(argv)
  names = [n for n in args.objectives.split(",") if n]
  unknown = sorted(set(names) - set(OBJECTIVES))
  if unknown:
    raise SystemExit(f"--objectives: unknown {unknown}; known: {list(OBJECTIVES)}.")
  parent = args.workdir or tempfile.mkdtemp(prefix="compare_objectives_")
  rows = []
  for i, name in enumerate(names):
    print(f"[{i + 1}/{len(names)}] {name}: {args.steps or 'default'} steps ({args.size})",
          file=sys.stderr, flush=True)
    rows.append(run_one(name, args.size, args.steps, os.path.join(parent, name)))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  import jax
  header = (f"Shapes, `{args.size}` size, {rows[0]['steps']} steps of batch "
            f"{rows[0]['batch_size']} each, {jax.device_count()} {jax.devices()[0].platform} "
            "device(s):")
  table = markdown(rows, header)
  print(table)
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
  if args.readme:
    replace_in_readme(args.readme, table)


if __name__ == "__main__":
  main()

"""Self-supervised pretraining on Fashion-MNIST on a CPU, evaluated by kNN and linear probe.

Each ``configs/<method>_fashion_mnist.py`` (``size=cpu``) is trained from scratch and its
frozen backbone features of the 60,000 training images are the memory bank of a weighted
kNN (and the training set of a linear probe) classifying the 10,000 test images. The same
evaluators run on raw pixels for the floor. Prints a markdown table, writes JSON, and
optionally replaces the table between ``<!-- ssl_fashion_mnist:start -->`` and
``<!-- ssl_fashion_mnist:end -->`` of a README.

  python benchmarks/ssl_fashion_mnist.py --methods simclr,swav \\
      --output benchmarks/results/ssl_fashion_mnist_cpu.json --readme README.md

``--set a.b=value`` overrides config fields (every method), ``--steps`` the step count.
Wall time includes compilation, data and the final evaluation.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare_objectives import median_steps_per_sec, replace_in_readme  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every method with a configs/<method>_fashion_mnist.py.
METHODS = tuple(sorted(p.name[:-len("_fashion_mnist.py")]
                       for p in (REPO / "configs").glob("*_fashion_mnist.py")))
MARKERS = ("<!-- ssl_fashion_mnist:start -->", "<!-- ssl_fashion_mnist:end -->")


def load_config(method: str, arg: str):
  path = REPO / "configs" / f"{method}_fashion_mnist.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def apply_overrides(config, overrides):
  for item in overrides:
    key, _, value = item.partition("=")
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value


def raw_pixel_baseline(config) -> dict:
  """The kNN / linear-probe evaluators of ``config`` on raw pixels (scaled to [0, 1])."""
  from contrastive_jax.data import fashion_mnist
  from contrastive_jax.evaluate import knn, linear_probe
  data_dir = config.data.get("data_dir")
  train_x, train_y = fashion_mnist.load("train", data_dir)
  test_x, test_y = fashion_mnist.load("test", data_dir)
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  out = {}
  for ev in config.eval.evaluators.values():
    # The evaluators' splits: the first num_train / num_test images (None: all).
    n_train, n_test = ev.get("num_train"), ev.get("num_test")
    splits = (flat(train_x[:n_train]), train_y[:n_train], flat(test_x[:n_test]),
              test_y[:n_test])
    if ev.kind == "knn":
      out["knn_acc1"] = knn.evaluate(*splits, k=ev.k, temperature=ev.temperature)["acc1"]
    elif ev.kind == "linear_probe":
      out["linear_acc1"] = linear_probe.evaluate(*splits, l2=ev.l2, steps=ev.steps)["acc1"]
  return out


def eval_curve(workdir: str) -> list:
  """``[(step, knn acc1), ...]`` of the run's evaluations."""
  curve = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      if "knn/fashion_mnist/acc1" in row:
        curve.append((row["step"], row["knn/fashion_mnist/acc1"]))
  return curve


def run_one(method: str, size: str, steps: int, overrides, workdir: str,
            eval_every: int) -> dict:
  from contrastive_jax import train
  config = load_config(method, f"size={size},steps={steps}")
  apply_overrides(config, overrides)
  config.eval.every_steps = eval_every  # 0: once, at the end
  start = time.time()
  results = train.train_and_evaluate(config, workdir)
  return {
      "method": method,
      "steps": config.total_steps,
      "batch_size": config.batch_size,
      "epochs": config.total_steps * config.batch_size / 60000,
      "backbone": dict(config.model.backbone),
      "knn_acc1": results.get("knn/fashion_mnist/acc1"),
      "linear_acc1": results.get("linear_probe/fashion_mnist/acc1"),
      "steps_per_sec": median_steps_per_sec(workdir),
      "wall_minutes": (time.time() - start) / 60,
      "knn_curve": eval_curve(workdir),
      "overrides": list(overrides),
  }


def markdown(rows, raw, header: str) -> str:
  fmt = lambda x: "–" if x is None else f"{100 * x:.1f} %"
  lines = [header, "",
           "| method | epochs | kNN acc1 | linear probe acc1 | wall (train + eval) |",
           "|---|---|---|---|---|",
           f"| raw pixels | – | {fmt(raw.get('knn_acc1'))} | {fmt(raw.get('linear_acc1'))} | – |"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['epochs']:.1f} | {fmt(r['knn_acc1'])} | "
                 f"{fmt(r['linear_acc1'])} | {r['wall_minutes']:.1f} min |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="simclr,swav")
  parser.add_argument("--size", default="cpu", choices=("cpu", "tiny"))
  parser.add_argument("--steps", type=int, default=0, help="0: the config's default")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override applied to every method (repeatable)")
  parser.add_argument("--eval_every", type=int, default=0,
                      help="also evaluate every N steps (the wall time then includes it)")
  parser.add_argument("--workdir", default=None, help="parent of the runs' workdirs "
                      "(default: a fresh temporary directory; an existing run is resumed)")
  parser.add_argument("--output", default=None, help="JSON file for the results")
  parser.add_argument("--readme", default=None, help="README whose table to replace")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; known: {list(METHODS)}.")
  parent = args.workdir or tempfile.mkdtemp(prefix="ssl_fashion_mnist_")
  rows = []
  for i, method in enumerate(methods):
    print(f"[{i + 1}/{len(methods)}] {method}", file=sys.stderr, flush=True)
    rows.append(run_one(method, args.size, args.steps, args.set,
                        os.path.join(parent, method), args.eval_every))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  reference = load_config(methods[0], f"size={args.size}")
  apply_overrides(reference, args.set)
  raw = raw_pixel_baseline(reference)
  import jax
  ev = next(e for e in reference.eval.evaluators.values() if e.kind == "knn")
  header = (f"Fashion-MNIST test accuracy of frozen backbone features (weighted kNN, k = {ev.k}, "
            f"T = {ev.temperature}, cosine; linear probe by L-BFGS), batch "
            f"{rows[0]['batch_size']}, {os.cpu_count()} CPU cores, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s):")
  table = markdown(rows, raw, header)
  print(table)
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps({"raw_pixels": raw, "runs": rows},
                                                    indent=2) + "\n")
  if args.readme:
    replace_in_readme(args.readme, table, MARKERS)


if __name__ == "__main__":
  main()

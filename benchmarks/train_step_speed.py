"""Speed of the jitted train step on synthetic batches, per compute dtype and batch size.

Runs the library's own per-device step (``parallel.map_step`` over a mesh of every device)
on random images and tokens, so it needs neither tf.data nor TensorFlow and isolates the
model + loss + optimizer from the input pipeline. Prints a table and writes JSON.

  python benchmarks/train_step_speed.py --config configs/clip_shapes.py --batch 128,1024 \\
      --dtypes float32,bfloat16 --steps 50 --output /tmp/step_speed.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import time
import types

import jax
import numpy as np

from contrastive_jax import optim, parallel, train_state
from contrastive_jax.objectives import make_objective

BYTE_VOCAB = 258  # contrastive_jax.data.tokenizers.ByteTokenizer.vocab_size (no TF import here)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(path.split(":")[1] if ":" in path else None)


def synthetic_batch(config, batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.tokenizer.context_length
  lengths = rng.integers(8, length, batch_size)
  mask = np.arange(length)[None] < lengths[:, None]
  text = np.where(mask, rng.integers(1, BYTE_VOCAB - 1, (batch_size, length)), 0)
  text[np.arange(batch_size), lengths - 1] = BYTE_VOCAB - 1  # EOT
  return {"image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
          "text": text.astype(np.int32), "text_mask": mask}


def measure(config, batch_size: int, dtype: str, steps: int, mode: str) -> dict:
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  config.batch_size = batch_size
  tokenizer = types.SimpleNamespace(vocab_size=BYTE_VOCAB,
                                    context_length=config.tokenizer.context_length)
  objective = make_objective(config, tokenizer)
  optimizer = optim.make_optimizer(config.optimizer, 10_000)
  mesh = parallel.make_mesh(config.parallel.data_axis_size)
  parallel.check_batch_size(batch_size, mesh)
  batch = synthetic_batch(config, batch_size)
  create = functools.partial(train_state.create, objective, optimizer, seed=0)
  state = jax.jit(create, out_shardings=parallel.replicated(mesh))(
      jax.tree.map(lambda x: x[:1], batch))
  step = parallel.map_step(functools.partial(train_state.train_step, objective=objective,
                                             optimizer=optimizer), mesh, mode)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(3):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  loss = float(metrics["loss"])
  return {"batch": batch_size, "dtype": dtype, "mode": mode, "devices": mesh.devices.size,
          "platform": jax.devices()[0].platform, "compile_s": round(compile_s, 2),
          "step_ms": round(1e3 * seconds, 3), "steps_per_s": round(1 / seconds, 2),
          "pairs_per_s": round(batch_size / seconds), "loss_after": loss,
          "finite": math.isfinite(loss)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/clip_shapes.py")
  parser.add_argument("--batch", default="128")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--mode", default="jit", choices=parallel.MODES)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  config = load_config(args.config)
  rows = [measure(config, int(b), d, args.steps, args.mode)
          for b in args.batch.split(",") for d in args.dtypes.split(",")]
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s), jax {jax.__version__}")
  print("| batch | dtype | compile s | step ms | steps/s | pairs/s | loss |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['dtype']} | {r['compile_s']} | {r['step_ms']} | "
          f"{r['steps_per_s']} | {r['pairs_per_s']} | {r['loss_after']:.4f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()

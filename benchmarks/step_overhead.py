"""Train-step overhead: the full CLIP step against the encoders' forward + backward alone.

Both programs run on the same mesh (every device, batch split over the rows), from the same
state and batch, in the same process:

* ``full``: the trainer's step (:func:`train_state.make_step`: ring loss in ``shard_map``,
  gradients, AdamW update, metrics), state donated as in training;
* ``encoders``: ``jax.grad`` of ``sum(image_emb) + sum(text_emb)`` with respect to the
  parameters, i.e. the two towers' forward and backward with the loss replaced by a sum
  and no optimizer.

The rounds are interleaved (full, encoders, full, ...) so load on a shared machine hits both
alike; the reported ratio is that of the best round of each (the least disturbed by other
load, as in ``input_pipeline.py``), with the per-round ratios alongside. Goal: ≤ 1.05.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/step_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

GOAL = 1.05


def _config(quick: bool, batch: int | None):
  from contrastive_jax import shapes_config
  config = shapes_config.image_text("size=tiny" if quick else "size=cpu", objective="clip")
  if batch:
    config.batch_size = batch
  return config


def _time(fn, steps: int) -> float:
  """Seconds per call of ``fn`` (which blocks on its own result)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def run(quick: bool = False, *, batch: int | None = None, steps: int | None = None,
        rounds: int | None = None) -> dict:
  """Measures ``full / encoders`` step time for tiny CLIP on every local device."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from contrastive_jax import optim, parallel, train, train_state
  from contrastive_jax.models import transformer
  config = _config(quick, batch)
  steps = steps or (3 if quick else 20)
  rounds = rounds or (2 if quick else 7)
  tokenizer = types.SimpleNamespace(vocab_size=258,
                                    context_length=config.tokenizer.context_length)
  from contrastive_jax.objectives import make_objective
  objective = make_objective(config, tokenizer)
  optimizer = optim.make_optimizer(config.optimizer, 10_000)
  mesh = parallel.make_mesh(-1)
  b, size, length = config.batch_size, config.data.image_size, config.tokenizer.context_length
  rng = np.random.default_rng(0)
  mask = np.arange(length)[None] < rng.integers(4, length, b)[:, None]
  batch_np = {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
              "text": np.where(mask, rng.integers(1, 257, (b, length)), 0).astype(np.int32),
              "text_mask": mask}
  shardings, _ = train.state_shardings(config, objective, optimizer, batch_np, mesh)
  state = train.initial_state(config, objective, optimizer, batch_np, mesh, shardings)
  full_step = train_state.make_step(config, objective, optimizer, mesh, shardings)
  batch = parallel.to_global(batch_np, mesh)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))

  def encoders_loss(params, batch):
    with transformer.rows_sharding(rows):
      out = objective.embed(params, {}, batch)
    return jnp.sum(out["image_emb"]) + jnp.sum(out["text_emb"])

  encoders = jax.jit(jax.grad(encoders_loss),
                     in_shardings=(shardings.params, parallel.batch_sharding(mesh)),
                     out_shardings=shardings.params)

  holder = {"state": state}

  def full():
    holder["state"], metrics = full_step(holder["state"], batch_np)
    jax.block_until_ready(metrics["loss"])

  def enc():
    jax.block_until_ready(encoders(holder["state"].params, batch))

  for fn in (full, enc):  # compile and warm up
    fn()
    fn()
  full_s, enc_s = [], []
  for _ in range(rounds):
    full_s.append(_time(full, steps))
    enc_s.append(_time(enc, steps))
  ratios = [f / e for f, e in zip(full_s, enc_s)]
  ratio = min(full_s) / min(enc_s)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"devices": mesh.size, "platform": jax.devices()[0].platform,
          "global_batch": b, "image_size": size, "context_length": length,
          "width": config.model.image.width, "params": int(params),
          "steps_per_round": steps, "rounds": rounds,
          "full_step_ms": round(1e3 * min(full_s), 3),
          "encoders_step_ms": round(1e3 * min(enc_s), 3),
          "ratio": round(ratio, 4), "ratios": [round(r, 4) for r in ratios],
          "goal": GOAL, "met": ratio <= GOAL}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  result = run(args.quick, batch=args.batch, steps=args.steps, rounds=args.rounds)
  print(json.dumps(result, indent=2))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

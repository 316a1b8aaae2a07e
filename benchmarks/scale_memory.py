"""Per-device memory of the CLIP train step under the scale settings (compiled, no timing).

Compiles the trainer's global-view step (:func:`train_state.sharded_train_step`, the path of
CLIP in mode ``jit``) for a ViT + text transformer on simulated devices and reads the
compiled program's memory analysis: ``state`` = bytes of the train state held per device
(parameters + optimizer moments), ``temp`` = the step's temporary buffers (activations,
gradients, collectives), and the activations the backward pass keeps for one micro-batch
(residuals of ``jax.vjp`` of the model, at the JAX level: XLA's CPU scheduler does not turn
remat's smaller residuals into a smaller ``temp``; accelerators' memory-aware schedulers
should, not measured here). Each row changes one setting from the baseline: FSDP over
2 / 4 / 8 devices, GradCache over 2 / 4 / 8 micro-batches at the same global batch, remat,
bfloat16.

  python benchmarks/scale_memory.py --devices 8 --width 256 --depth 4 --image_size 64 \\
      --batch 256 \\
      --output benchmarks/results/scale_memory_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types

VARIANTS = [("replicated", {}), ("fsdp=2", {"fsdp": 2}), ("fsdp=4", {"fsdp": 4}),
            ("fsdp=8", {"fsdp": 8}), ("accum=2", {"accum": 2}), ("accum=4", {"accum": 4}),
            ("accum=8", {"accum": 8}), ("remat", {"remat": True}),
            ("bfloat16", {"dtype": "bfloat16"}), ("fsdp=8 + accum=4 + remat + bfloat16",
                                                  {"fsdp": 8, "accum": 4, "remat": True,
                                                   "dtype": "bfloat16"})]


def model_config(width: int, depth: int, image_size: int, batch: int):
  from contrastive_jax import shapes_config
  config = shapes_config.image_text("size=cpu", objective="clip")
  config.batch_size = batch
  config.data.image_size = image_size
  config.model.embed_dim = width
  config.model.image = dict(patch_size=8, width=width, depth=depth, num_heads=width // 64,
                            pool="cls")
  config.model.text = dict(width=width, depth=depth, num_heads=width // 64)
  return config


def measure(config, *, fsdp: int = 1, accum: int = 1, remat: bool = False,
            dtype: str = "float32") -> dict:
  """Compiles one step and returns its per-device memory (bytes)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from contrastive_jax import optim, parallel, partitioning, train_state
  from contrastive_jax.objectives import make_objective
  config = config.copy_and_resolve_references()
  config.model.remat, config.model.dtype = remat, dtype
  tokenizer = types.SimpleNamespace(vocab_size=258,
                                    context_length=config.tokenizer.context_length)
  objective = make_objective(config, tokenizer)
  optimizer = optim.make_optimizer(config.optimizer, 10_000)
  mesh = parallel.make_mesh(-1, fsdp=fsdp)
  size, length, b = config.data.image_size, config.tokenizer.context_length, config.batch_size
  batch = {"image": np.zeros((b, size, size, 3), np.float32),
           "text": np.zeros((b, length), np.int32), "text_mask": np.ones((b, length), bool)}
  sample = jax.tree.map(lambda x: x[:1], batch)
  create = functools.partial(train_state.create, objective, optimizer, seed=0)
  abstract = jax.eval_shape(create, sample)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0), sample)[0]
  shardings = partitioning.state_shardings(
      abstract, partitioning.param_shardings(boxed, mesh), optimizer, mesh)
  step = jax.jit(functools.partial(train_state.sharded_train_step, objective=objective,
                                   optimizer=optimizer, mesh=mesh, accum_steps=accum),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  as_input = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  state_in = jax.tree.map(as_input, abstract, shardings)
  batch_in = jax.tree.map(lambda x: as_input(x, parallel.batch_sharding(mesh)), batch)
  memory = step.lower(state_in, batch_in).compile().memory_analysis()
  state_bytes = sum(
      int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  params = sum(x.size for x in jax.tree.leaves(abstract.params))
  # Activations the backward pass keeps (the residuals of jax.vjp of the model on one
  # micro-batch, per device): what remat and GradCache cut, whatever the backend's scheduler.
  rows = jax.tree.map(lambda x: jax.ShapeDtypeStruct((b // accum,) + x.shape[1:], x.dtype),
                      batch)
  embed = lambda p, r: sum(jnp.sum(v) for v in objective.embed(p, {}, r).values()
                           if jnp.issubdtype(v.dtype, jnp.floating))
  residuals = jax.eval_shape(lambda p, r: jax.vjp(lambda q: embed(q, r), p)[1],
                             abstract.params, rows)
  param_ids = {(x.shape, x.dtype) for x in jax.tree.leaves(abstract.params)}
  kept = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals)
             if (x.shape, x.dtype) not in param_ids) // mesh.size
  return {"fsdp": fsdp, "accum_steps": accum, "remat": remat, "dtype": dtype,
          "devices": mesh.size, "batch": b, "parameters": int(params),
          "state_bytes": state_bytes, "temp_bytes": int(memory.temp_size_in_bytes),
          "argument_bytes": int(memory.argument_size_in_bytes), "activation_bytes": int(kept)}


def _mib(n):
  return f"{n / 2**20:.1f}"


def table(rows) -> str:
  base = rows[0]
  lines = ["| setting | state MiB / device | compiled temp MiB / device | temp vs baseline | "
           "activations kept for backward MiB / device |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {_mib(r['state_bytes'])} | {_mib(r['temp_bytes'])} | "
                 f"{r['temp_bytes'] / base['temp_bytes']:.2f} | "
                 f"{_mib(r['activation_bytes'])} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=6)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--variants", default="",
                      help="comma-separated names of VARIANTS to run (empty: all)")
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  import jax
  config = model_config(args.width, args.depth, args.image_size, args.batch)
  chosen = set(args.variants.split(",")) if args.variants else None
  rows = []
  for name, kwargs in VARIANTS:
    if chosen is None or name in chosen:
      rows.append(dict(name=name, **measure(config, **kwargs)))
      print(f"{name}: state {_mib(rows[-1]['state_bytes'])} MiB, temp "
            f"{_mib(rows[-1]['temp_bytes'])} MiB", flush=True)
  print(f"\n{rows[0]['parameters']:,} parameters (width {args.width}, depth {args.depth} "
        f"per tower), global batch {args.batch}, {jax.device_count()} {jax.devices()[0].platform}"
        f" devices, jax {jax.__version__}\n")
  print(table(rows))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"platform": jax.devices()[0].platform, "jax": jax.__version__,
                 "width": args.width, "depth": args.depth, "image_size": args.image_size,
                 "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()

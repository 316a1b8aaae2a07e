"""Compiled-memory measurements of losses (used by benchmarks/ and tests; jax only)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.losses.clip import clip_loss
from contrastive_jax.losses.clip_ring import ring_clip_loss


def temp_bytes(loss_fn, global_batch: int, dim: int, num_devices: int) -> int:
  """Per-device temporary bytes of ``value_and_grad(loss_fn)`` inside ``shard_map``.

  ``loss_fn(x, y, scale, axis_name) -> (loss, metrics)``; inputs ``[B, dim]`` float32.
  """
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))

  def local(x, y, s):
    grad = jax.grad(lambda x, y, s: loss_fn(x, y, s, "data")[0], argnums=(0, 1, 2))
    return grad(x, y, s)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                             out_specs=(P("data"), P("data"), P())))
  spec = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32,
                              sharding=NamedSharding(mesh, P("data")))
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  return fn.lower(spec, spec, scale).compile().memory_analysis().temp_size_in_bytes


def clip_memory_table(batches: Sequence[int], dim: int, num_devices: int,
                      block_size: int) -> List[Tuple[int, int, int]]:
  """``[(B, reference_bytes, ring_bytes)]`` for the CLIP loss."""
  reference = lambda x, y, s, axis: clip_loss(x, y, s, axis_name=axis)
  ring = lambda x, y, s, axis: ring_clip_loss(x, y, s, block_size=block_size, axis_name=axis)
  return [(b, temp_bytes(reference, b, dim, num_devices), temp_bytes(ring, b, dim, num_devices))
          for b in batches]


def loglog_slopes(rows) -> Tuple[float, float]:
  """Least-squares slopes of log(bytes) against log(batch) for both columns."""
  logb = np.log([r[0] for r in rows])
  slope = lambda col: float(np.polyfit(logb, np.log([r[col] for r in rows]), 1)[0])
  return slope(1), slope(2)


__all__ = ["clip_memory_table", "loglog_slopes", "temp_bytes"]

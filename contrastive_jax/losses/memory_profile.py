"""Compiled-memory measurements of losses (used by benchmarks/ and tests; jax only)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.losses.clip import clip_loss
from contrastive_jax.losses.clip_ring import ring_clip_loss
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss


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


def _pairs(block_size):
  """loss name -> (global-view reference, lean ring form), as ``fn(x, y, s, axis)``."""
  return {
      "clip": (lambda x, y, s, axis: clip_loss(x, y, s, axis_name=axis),
               lambda x, y, s, axis: ring_clip_loss(x, y, s, block_size=block_size,
                                                    axis_name=axis)),
      "siglip": (lambda x, y, s, axis: siglip_loss(x, y, s, -10.0, axis_name=axis),
                 lambda x, y, s, axis: ring_siglip_loss(x, y, s, -10.0, block_size=block_size,
                                                        axis_name=axis)),
  }


LOSSES = ("clip", "siglip")


def memory_table(name: str, batches: Sequence[int], dim: int, num_devices: int,
                 block_size: int) -> List[Tuple[int, int, int]]:
  """``[(B, reference_bytes, ring_bytes)]`` for the loss ``name`` (one of ``LOSSES``)."""
  reference, lean = _pairs(block_size)[name]
  return [(b, temp_bytes(reference, b, dim, num_devices), temp_bytes(lean, b, dim, num_devices))
          for b in batches]


def loglog_slopes(rows) -> Tuple[float, float]:
  """Least-squares slopes of log(bytes) against log(batch) for both columns."""
  logb = np.log([r[0] for r in rows])
  slope = lambda col: float(np.polyfit(logb, np.log([r[col] for r in rows]), 1)[0])
  return slope(1), slope(2)


__all__ = ["LOSSES", "loglog_slopes", "memory_table", "temp_bytes"]

"""Building blocks shared by the losses: normalisation and cross-device gathers.

Depends on jax only. Every helper works on the local shard when ``axis_name`` is given and
on the whole batch otherwise, so a loss written with them runs unchanged on one device,
inside ``jax.shard_map`` and inside ``jax.pmap``.
"""

from __future__ import annotations

from typing import Hashable, Optional

import jax
import jax.numpy as jnp

AxisName = Optional[Hashable]

# Added to the norm before dividing (big_vision's convention); keeps zero rows finite.
NORM_EPS = 1e-8


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """Casts to float32 and divides by the L2 norm along ``axis`` (idempotent up to eps).

  A zero row stays zero with a finite gradient: the squared norm is floored at the smallest
  normal float before the square root, whose derivative at 0 would otherwise be infinite.
  """
  x = x.astype(jnp.float32)
  squared = jnp.sum(x * x, axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(squared, jnp.finfo(jnp.float32).tiny))
  return x / (norm + eps)


def all_gather_rows(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Concatenates the local shards ``[b, ...]`` of every device into ``[W * b, ...]``.

  Differentiable: the transpose (``psum_scatter``) routes the cotangents of remote copies
  back to the device that owns the rows, so gradients stay exact ("gather with grad").
  Identity when ``axis_name`` is None.
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def shard_offset(local_rows: int, axis_name: AxisName) -> jax.Array:
  """Global index of this device's first row: ``axis_index * local_rows`` (0 if unsharded)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(axis_name) * local_rows


def global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """``psum`` over ``axis_name`` (identity when None)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


"""Compiled-memory measurements of losses (used by benchmarks/ and tests; jax only)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.losses.clip import clip_loss
from contrastive_jax.losses.clip_ring import ring_clip_loss
from contrastive_jax.losses.dcl import dcl_loss
from contrastive_jax.losses.dreamlip import multi_positive_loss, ring_multi_positive_loss
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.filip_ring import ring_filip_loss
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss
from contrastive_jax.losses.simclr import nt_xent_loss
from contrastive_jax.losses.simclr_ring import ring_dcl_loss, ring_nt_xent_loss

# Temperature of the two-view losses (NT-Xent, DCL); they ignore the profiled ``scale``.
_TAU = 0.1


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


def temp_bytes_tokens(loss_fn, global_batch: int, image_tokens: int, text_tokens: int,
                      dim: int, num_devices: int) -> int:
  """Per-device temporary bytes of ``value_and_grad`` of a token-level loss in ``shard_map``.

  ``loss_fn(x, y, mask, scale, axis_name) -> (loss, metrics)``; inputs float32
  ``[B, image_tokens, dim]``, ``[B, text_tokens, dim]`` and a bool mask ``[B, text_tokens]``;
  gradients w.r.t. both token tensors and the scale.
  """
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))

  def local(x, y, m, s):
    grad = jax.grad(lambda x, y, s: loss_fn(x, y, m, s, "data")[0], argnums=(0, 1, 2))
    return grad(x, y, s)

  data = P("data")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(data, data, data, P()),
                             out_specs=(data, data, P())))
  sharded = NamedSharding(mesh, data)
  image = jax.ShapeDtypeStruct((global_batch, image_tokens, dim), jnp.float32, sharding=sharded)
  text = jax.ShapeDtypeStruct((global_batch, text_tokens, dim), jnp.float32, sharding=sharded)
  mask = jax.ShapeDtypeStruct((global_batch, text_tokens), jnp.bool_, sharding=sharded)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  return fn.lower(image, text, mask, scale).compile().memory_analysis().temp_size_in_bytes


def temp_bytes_multi(loss_fn, global_batch: int, texts: int, dim: int,
                     num_devices: int) -> int:
  """Per-device temporary bytes of ``value_and_grad`` of a multi-positive loss in ``shard_map``.

  ``loss_fn(x, y, scale, axis_name) -> (loss, metrics)``; inputs float32 ``[B, dim]`` images
  and ``[B, texts, dim]`` texts (``texts`` per image); gradients w.r.t. both and the scale.
  """
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))

  def local(x, y, s):
    grad = jax.grad(lambda x, y, s: loss_fn(x, y, s, "data")[0], argnums=(0, 1, 2))
    return grad(x, y, s)

  data = P("data")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(data, data, P()),
                             out_specs=(data, data, P())))
  sharded = NamedSharding(mesh, data)
  image = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sharded)
  text = jax.ShapeDtypeStruct((global_batch, texts, dim), jnp.float32, sharding=sharded)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  return fn.lower(image, text, scale).compile().memory_analysis().temp_size_in_bytes


def _pairs(block_size):
  """loss name -> (global-view reference, lean ring form), as ``fn(x, y, s, axis)``."""
  return {
      "clip": (lambda x, y, s, axis: clip_loss(x, y, s, axis_name=axis),
               lambda x, y, s, axis: ring_clip_loss(x, y, s, block_size=block_size,
                                                    axis_name=axis)),
      "siglip": (lambda x, y, s, axis: siglip_loss(x, y, s, -10.0, axis_name=axis),
                 lambda x, y, s, axis: ring_siglip_loss(x, y, s, -10.0, block_size=block_size,
                                                        axis_name=axis)),
      # Two views x, y of the same examples; DCLW (sigma) shares DCL's ring, its weights are
      # O(b) extra.
      "nt_xent": (lambda x, y, s, axis: nt_xent_loss(x, y, _TAU, axis_name=axis),
                  lambda x, y, s, axis: ring_nt_xent_loss(x, y, _TAU, block_size=block_size,
                                                          axis_name=axis)),
      "dcl": (lambda x, y, s, axis: dcl_loss(x, y, _TAU, axis_name=axis),
              lambda x, y, s, axis: ring_dcl_loss(x, y, _TAU, block_size=block_size,
                                                  axis_name=axis)),
  }


def _token_pairs(block_size):
  """Token-level loss name -> (reference, lean ring form), as ``fn(x, y, mask, s, axis)``."""
  return {
      "filip": (lambda x, y, m, s, axis: filip_loss(x, y, m, s, axis_name=axis),
                lambda x, y, m, s, axis: ring_filip_loss(x, y, m, s, block_size=block_size,
                                                         axis_name=axis)),
  }


def _multi_pairs(block_size):
  """Multi-positive loss name -> (reference, lean ring form), as ``fn(x, y, s, axis)`` with
  ``y [B, T, D]``."""
  return {
      "multi_positive": (
          lambda x, y, s, axis: multi_positive_loss(x, y, s, axis_name=axis),
          lambda x, y, s, axis: ring_multi_positive_loss(x, y, s, block_size=block_size,
                                                         axis_name=axis)),
  }


# Embedding losses (inputs [B, D]), token-level losses (inputs [B, T, D] + mask) and
# multi-positive losses (images [B, D], texts [B, T, D]).
LOSSES = ("clip", "siglip", "nt_xent", "dcl")
TOKEN_LOSSES = ("filip",)
MULTI_POSITIVE_LOSSES = ("multi_positive",)


def _measure(name: str, global_batch: int, dim: int, num_devices: int, block_size: int,
             image_tokens: int, text_tokens: int, texts_per_image: int = 4) -> Tuple[int, int]:
  """``(reference_bytes, ring_bytes)`` for one configuration."""
  if name in MULTI_POSITIVE_LOSSES:
    return tuple(temp_bytes_multi(fn, global_batch, texts_per_image, dim, num_devices)
                 for fn in _multi_pairs(block_size)[name])
  if name in TOKEN_LOSSES:
    return tuple(temp_bytes_tokens(fn, global_batch, image_tokens, text_tokens, dim, num_devices)
                 for fn in _token_pairs(block_size)[name])
  if name in LOSSES:
    return tuple(temp_bytes(fn, global_batch, dim, num_devices) for fn in _pairs(block_size)[name])
  raise ValueError(f"unknown loss {name!r}; expected one of "
                   f"{LOSSES + TOKEN_LOSSES + MULTI_POSITIVE_LOSSES}")


def memory_table(name: str, batches: Sequence[int], dim: int, num_devices: int,
                 block_size: int, *, image_tokens: int = 16, text_tokens: int = 8,
                 texts_per_image: int = 4) -> List[Tuple[int, int, int]]:
  """``[(B, reference_bytes, ring_bytes)]`` for the loss ``name`` (``LOSSES``,
  ``TOKEN_LOSSES`` or ``MULTI_POSITIVE_LOSSES``; the token counts only matter for
  ``TOKEN_LOSSES``, ``texts_per_image`` only for ``MULTI_POSITIVE_LOSSES``)."""
  return [(b,) + _measure(name, b, dim, num_devices, block_size, image_tokens, text_tokens,
                          texts_per_image)
          for b in batches]


def device_table(name: str, global_batch: int, device_counts: Sequence[int], dim: int,
                 block_size: int, *, image_tokens: int = 16, text_tokens: int = 8,
                 texts_per_image: int = 4) -> List[Tuple[int, int, int]]:
  """``[(W, reference_bytes, ring_bytes)]`` at a fixed global batch on the first ``W``
  devices (a sub-mesh), for each ``W`` in ``device_counts``."""
  return [(w,) + _measure(name, global_batch, dim, w, block_size, image_tokens, text_tokens,
                          texts_per_image)
          for w in device_counts]


def loglog_slopes(rows) -> Tuple[float, float]:
  """Least-squares slopes of log(bytes) against log(batch) for both columns."""
  logb = np.log([r[0] for r in rows])
  slope = lambda col: float(np.polyfit(logb, np.log([r[col] for r in rows]), 1)[0])
  return slope(1), slope(2)


__all__ = ["LOSSES", "MULTI_POSITIVE_LOSSES", "TOKEN_LOSSES", "device_table", "loglog_slopes",
           "memory_table", "temp_bytes", "temp_bytes_multi", "temp_bytes_tokens"]

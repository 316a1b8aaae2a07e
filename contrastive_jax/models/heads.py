"""Projection heads on top of the towers (SLIP's SimCLR head, CLIP🚀's local projectors, the
SimCLR / SwAV / MoCo-v2 / PixPro BatchNorm MLPs)."""

from __future__ import annotations

from typing import Any, Hashable, Optional

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("layer", "batch", "none")


class MLPHead(nn.Module):
  """``num_layers`` dense layers with a norm + ReLU after every hidden one (float32 output).

  Works on any ``[..., D]`` input (a pooled ``[B, D]`` embedding, or a ``[B, h, w, D]`` map:
  Dense on the last axis is PixPro's 1×1-convolution projector).

  Attributes:
    hidden: width of the hidden layers.
    out: output width.
    num_layers: dense layers in all (``num_layers − 1`` hidden ones).
    norm: after each hidden Dense: ``"layer"`` (LayerNorm: stateless, per-example; the
      default), ``"batch"`` (BatchNorm; statistics over every axis but the last, synchronised
      over ``axis_name`` when given; hidden Dense layers then have no bias) or ``"none"``.
    last_norm: BatchNorm without scale or bias on the output (SimCLR-v2 / MoCo-v3 style); the
      last Dense then has no bias.
    bn_momentum: running-average momentum of the BatchNorms (flax convention).
    dtype: compute dtype; parameters and output are float32.

  ``__call__(x, *, train=True, axis_name=None)``: ``train`` and ``axis_name`` only matter
  with BatchNorm (``train=True`` normalises with batch moments and needs
  ``mutable=['batch_stats']``; ``False`` uses the running averages).
  """

  hidden: int
  out: int
  num_layers: int = 3
  norm: str = "layer"
  last_norm: bool = False
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True, axis_name: Optional[Hashable] = None):
    if self.norm not in NORMS:
      raise ValueError(f"MLPHead norm={self.norm!r}; expected one of {NORMS}.")
    batch_norm = lambda name, **kw: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, axis_name=axis_name,
        dtype=self.dtype, name=name, **kw)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden, use_bias=self.norm != "batch", dtype=self.dtype,
                   name=f"dense_{i}")(x)
      if self.norm == "layer":
        x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
      elif self.norm == "batch":
        x = batch_norm(f"norm_{i}")(x)
      x = nn.relu(x)
    last = self.num_layers - 1
    x = nn.Dense(self.out, use_bias=not self.last_norm, dtype=self.dtype,
                 name=f"dense_{last}")(x)
    if self.last_norm:
      x = batch_norm(f"norm_{last}", use_scale=False, use_bias=False)(x)
    return x.astype(jnp.float32)

"""Projection heads on top of the towers (SLIP's SimCLR head, CLIP🚀's local projectors)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLPHead(nn.Module):
  """``num_layers`` dense layers with LayerNorm + ReLU between them (float32 output).

  SLIP's and CLIP🚀's heads use BatchNorm (synchronised across devices); LayerNorm keeps the
  head stateless and per-example, so the model needs no batch statistics.
  """

  hidden: int
  out: int
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden, dtype=self.dtype, name=f"dense_{i}")(x)
      x = nn.relu(nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x))
    x = nn.Dense(self.out, dtype=self.dtype, name=f"dense_{self.num_layers - 1}")(x)
    return x.astype(jnp.float32)

"""Pre-LayerNorm transformer encoder shared by the image and text towers."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module):
  """Two-layer GELU MLP: ``[..., width] -> [..., mlp_dim] -> [..., width]``."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(1e-6), name=name)
    x = nn.gelu(dense(self.mlp_dim, "fc1")(x))
    return dense(width, "fc2")(x)


class EncoderBlock(nn.Module):
  """``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask: Optional[jax.Array] = None):
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name="attn")(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class Transformer(nn.Module):
  """``depth`` encoder blocks followed by a final LayerNorm; ``[B, N, W] -> [B, N, W]``."""

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask: Optional[jax.Array] = None):
    mlp_dim = int(self.mlp_ratio * x.shape[-1])
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, mlp_dim, dtype=self.dtype, name=f"block{i}")(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)

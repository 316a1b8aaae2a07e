"""Vision Transformer image tower (Dosovitskiy et al., 2021)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.transformer import Transformer, logical

POOLS = ("cls", "mean")


class ViT(nn.Module):
  """Patchify, add learned position embeddings, encode, pool.

  ``__call__(images)`` takes float images ``[B, H, W, C]`` (H and W divisible by
  ``patch_size``) and returns ``(pooled [B, width], tokens [B, N, width])`` where ``tokens``
  are the ``N = HW / patch_size²`` patch tokens after the final LayerNorm (no class token).

  CLIP-compatible options (defaults keep the original behaviour and parameter names):
  ``activation`` / ``layer_norm_epsilon`` / ``mlp_dim`` (see :class:`Transformer`) and
  ``remat``: see :class:`Transformer`. ``ln_pre``: a LayerNorm ``ln_pre`` on the tokens
  (class token included) before the blocks.
  Position embeddings are added to the patches only; the class token ``cls`` is prepended
  afterwards, so CLIP's ``class_embedding + positional_embedding[0]`` maps onto ``cls``.
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  pool: str = "cls"
  dtype: Any = jnp.float32
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6
  ln_pre: bool = False
  mlp_dim: Optional[int] = None
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool={self.pool!r}; expected one of {POOLS}.")
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
          f"Image size {h}x{w} is not divisible by patch_size={self.patch_size}.")
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype,
                kernel_init=logical(nn.linear.default_kernel_init, None, None, None, "embed"),
                name="patch_embed")(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    x = x + self.param("pos_embed", logical(nn.initializers.normal(0.02), None, None, "embed"),
                       (1,) + x.shape[1:]).astype(self.dtype)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width)).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="ln_pre")(x)
    x = Transformer(self.depth, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                    activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                    mlp_dim=self.mlp_dim, remat=self.remat, name="encoder")(x)
    if self.pool == "cls":
      return x[:, 0], x[:, 1:]
    return x.mean(axis=1), x

"""Causal text transformer tower with end-of-text pooling (CLIP's text encoder)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.transformer import Transformer, logical


class TextTransformer(nn.Module):
  """Token + position embeddings, causal encoder, pooled at the end-of-text token.

  ``__call__(tokens, mask)`` takes int32 ``tokens [B, L]`` and bool ``mask [B, L]`` (True on
  real tokens, which come first and end with the end-of-text token) and returns
  ``(pooled [B, width], tokens [B, L, width])``. ``pooled`` is the feature at the last
  valid position (the EOT token); with causal attention it has seen the whole text and
  padding never influences valid positions. With the CLIP BPE tokenizer this is the position
  CLIP pools at (``argmax`` of the token ids = the EOT token).

  ``activation`` / ``layer_norm_epsilon`` / ``mlp_dim`` / ``remat``: see :class:`Transformer`.
  """

  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6
  mlp_dim: Optional[int] = None
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, mask):
    _, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"Text length {length} exceeds context_length={self.context_length}.")
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=logical(nn.initializers.normal(0.02), "vocab", "embed"),
                 dtype=self.dtype, name="token_embed")(tokens)
    pos = self.param("pos_embed", logical(nn.initializers.normal(0.01), None, None, "embed"),
                     (1, self.context_length, self.width))
    x = x + pos[:, :length].astype(self.dtype)
    causal = nn.make_causal_mask(tokens)
    x = Transformer(self.depth, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                    activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                    mlp_dim=self.mlp_dim, remat=self.remat, name="encoder")(x, causal)
    eot = jnp.maximum(mask.sum(axis=1) - 1, 0)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return pooled, x

"""Two-tower image-text model: ViT + causal text transformer + linear projections."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.transformer import logical
from contrastive_jax.models.vit import ViT

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


class TwoTower(nn.Module):
  """Image and text towers projected into one embedding space.

  Attributes:
    image: keyword arguments of :class:`ViT`.
    text: keyword arguments of :class:`TextTransformer`.
    embed_dim: size of the shared embedding space.
    logit_scale_init: initial value of the ``logit_scale`` parameter θ (scale = exp θ).
    logit_bias_init: initial ``logit_bias`` (SigLIP); None for no bias parameter.
    dtype: compute dtype of both towers; parameters and outputs stay float32.
    remat: rematerialise the encoder blocks of both towers (see :class:`Transformer`).

  ``__call__(image, text, text_mask)`` returns a dict with ``image_emb [B, E]``,
  ``text_emb [B, E]`` (pooled, projected, not normalised), ``image_tokens [B, N, E]``,
  ``text_tokens [B, L, E]`` (token features through the same projections), ``text_mask``,
  ``logit_scale`` (exp θ) and, if configured, ``logit_bias``; all float32.
  """

  image: Mapping[str, Any]
  text: Mapping[str, Any]
  embed_dim: int
  logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
  logit_bias_init: Optional[float] = None
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.image_tower = ViT(**{"remat": self.remat, **self.image}, dtype=self.dtype)
    self.text_tower = TextTransformer(**{"remat": self.remat, **self.text}, dtype=self.dtype)
    proj = lambda: nn.Dense(
        self.embed_dim, use_bias=False, dtype=self.dtype,
        kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "joint"))
    self.image_proj = proj()
    self.text_proj = proj()
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(self.logit_scale_init), ())
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), ())

  def encode_image(self, image):
    """``[B, H, W, C]`` floats -> ``(emb [B, E], tokens [B, N, E])`` in float32."""
    pooled, tokens = self.image_tower(image)
    f32 = lambda x: x.astype(jnp.float32)
    return f32(self.image_proj(pooled)), f32(self.image_proj(tokens))

  def encode_text(self, text, text_mask):
    """int32 ``[B, L]`` + bool mask -> ``(emb [B, E], tokens [B, L, E])`` in float32."""
    pooled, tokens = self.text_tower(text, text_mask)
    f32 = lambda x: x.astype(jnp.float32)
    return f32(self.text_proj(pooled)), f32(self.text_proj(tokens))

  def __call__(self, image, text, text_mask):
    image_emb, image_tokens = self.encode_image(image)
    text_emb, text_tokens = self.encode_text(text, text_mask)
    out = dict(image_emb=image_emb, text_emb=text_emb, image_tokens=image_tokens,
               text_tokens=text_tokens, text_mask=text_mask,
               logit_scale=jnp.exp(self.logit_scale))
    if self.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    return out

"""DreamLIP: raw caption + sampled long-caption sentences (METHODS.md §1.5).

The CLIP towers plus a second learnable scale for the grouping term; every image is paired
with its raw caption and the ``K`` sentences :mod:`contrastive_jax.data.subcaptions` samples
from its long caption, all ``K + 1`` encoded by one batched text-tower call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax import losses
from contrastive_jax.models import TwoTower
from contrastive_jax.models.two_tower import CLIP_LOGIT_SCALE_INIT
from contrastive_jax.objectives import base


class _Scale(nn.Module):
  """One learnable log-scale θ, named ``logit_scale`` so that the optimizer's projection
  (:func:`contrastive_jax.optim.make_optimizer`, which matches that leaf name) clamps it at
  ``config.optimizer.logit_scale_max`` like CLIP's."""

  init_value: float = CLIP_LOGIT_SCALE_INIT

  @nn.compact
  def __call__(self):
    return self.param("logit_scale", nn.initializers.constant(self.init_value), ())


class DreamLipModel(nn.Module):
  """:class:`TwoTower` plus the grouping term's scale ``local/logit_scale``.

  ``__call__(image, text, text_mask, subcaptions, subcaption_mask)`` with ``text [b, L]``,
  ``subcaptions [b, K, L]`` returns ``image_emb [b, E]``, ``image_tokens [b, N, E]``,
  ``text_emb [b, K + 1, E]`` (index 0: the raw caption), ``logit_scale`` and
  ``logit_scale_local`` (both ``exp θ``); all float32.
  """

  towers: TwoTower
  logit_scale_local_init: float = CLIP_LOGIT_SCALE_INIT

  def setup(self):
    self.local = _Scale(self.logit_scale_local_init)

  def encode_image(self, image):
    return self.towers.encode_image(image)

  def encode_text(self, text, text_mask):
    return self.towers.encode_text(text, text_mask)

  def __call__(self, image, text, text_mask, subcaptions, subcaption_mask):
    image_emb, image_tokens = self.encode_image(image)
    texts = jnp.concatenate([text[:, None], subcaptions], axis=1)  # [b, T, L]
    masks = jnp.concatenate([text_mask[:, None], subcaption_mask], axis=1)
    b, t, length = texts.shape
    text_emb, _ = self.encode_text(texts.reshape(b * t, length), masks.reshape(b * t, length))
    return dict(image_emb=image_emb, image_tokens=image_tokens,
                text_emb=text_emb.reshape(b, t, -1),
                logit_scale=jnp.exp(self.towers.variables["params"]["logit_scale"]),
                logit_scale_local=jnp.exp(self.local()))


class DreamLip:
  """DreamLIP's loss (:func:`contrastive_jax.losses.dreamlip_loss`) on the CLIP towers.

  Config: ``config.loss.multi_positive_weight``, ``grouping_weight``, ``delta``,
  ``multi_positive_form`` (``"infonce"`` | ``"circle"``), ``block_size``;
  ``config.model.logit_scale_local_init``; ``config.data.subcaptions.num_subcaptions``.
  """

  batch_keys = ("image", "text", "text_mask", "subcaptions", "subcaption_mask")

  def __init__(self, config, tokenizer):
    model = config.model
    towers = base.two_tower_from_config(
        model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
        logit_scale_init=model.get("logit_scale_init", CLIP_LOGIT_SCALE_INIT))
    self.model = DreamLipModel(
        towers, logit_scale_local_init=model.get("logit_scale_local_init",
                                                 CLIP_LOGIT_SCALE_INIT))
    loss = config.get("loss", {})
    self.loss_kwargs: dict[str, Any] = dict(
        multi_positive_weight=loss.get("multi_positive_weight", 1.0),
        grouping_weight=loss.get("grouping_weight", 1.0),
        delta=loss.get("delta", 0.0),
        multi_positive_form=loss.get("multi_positive_form", "infonce"),
        block_size=loss.get("block_size"))

  def _inputs(self, batch):
    return (batch["image"], batch["text"], batch["text_mask"], batch["subcaptions"],
            batch["subcaption_mask"])

  def init(self, rng, batch):
    return self.model.init(rng, *self._inputs(batch))["params"], {}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # no stochastic layers
    out = self.model.apply({"params": params}, *self._inputs(batch))
    loss, metrics = losses.dreamlip_loss(
        out["image_emb"], out["text_emb"], out["image_tokens"], out["logit_scale"],
        out["logit_scale_local"], axis_name=axis_name, **self.loss_kwargs)
    metrics["logit_scale"] = out["logit_scale"]
    metrics["logit_scale_local"] = out["logit_scale_local"]
    return loss, (metrics, state)

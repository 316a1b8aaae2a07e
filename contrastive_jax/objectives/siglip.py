"""SigLIP: two towers trained with the pairwise sigmoid loss (METHODS.md §1.2)."""

from __future__ import annotations

import math

from contrastive_jax import losses
from contrastive_jax.objectives import base
from contrastive_jax.objectives.clip import Clip

SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


class Siglip(Clip):
  """Image-text pretraining with SigLIP's loss, in its memory-lean ring form
  (:func:`contrastive_jax.losses.ring_siglip_loss`, equal to ``siglip_loss``) for large
  batches and the global view for small ones (``config.loss.ring``, :func:`base.use_ring`).

  The model's scale parameter starts at ``config.model.logit_scale_init`` (ln 10) and its
  bias at ``config.model.logit_bias_init`` (−10), the paper's initialisation.
  """

  def __init__(self, config, tokenizer):
    self.model = base.two_tower_from_config(
        config.model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
        logit_scale_init=config.model.get("logit_scale_init", SIGLIP_LOGIT_SCALE_INIT),
        logit_bias_init=config.model.get("logit_bias_init", SIGLIP_LOGIT_BIAS_INIT))
    self.block_size = config.loss.get("block_size") if "loss" in config else None
    self.ring = base.ring_setting(config)
    self.geometry = base.geometry_enabled(config)

  def embed(self, params, state, batch):
    del state
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    return {k: out[k] for k in ("image_emb", "text_emb", "logit_scale", "logit_bias")}

  def contrast(self, out, state, rng, *, axis_name=None):
    del rng  # no stochastic terms
    args = (out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"])
    if base.use_ring(self.ring, self.block_size, args[0].shape[0], axis_name):
      loss, metrics = losses.ring_siglip_loss(*args, block_size=self.block_size,
                                              axis_name=axis_name)
    else:
      loss, metrics = losses.siglip_loss(*args, axis_name=axis_name)
    metrics["logit_scale"] = out["logit_scale"]
    metrics["logit_bias"] = out["logit_bias"]
    return loss, (self._geometry(metrics, out, axis_name), state)

"""CLIP: two towers trained with symmetric InfoNCE (METHODS.md §1.1)."""

from __future__ import annotations

from contrastive_jax import losses
from contrastive_jax.objectives import base


class Clip:
  """Image-text contrastive pretraining with :func:`contrastive_jax.losses.clip_loss`."""

  batch_keys = ("image", "text", "text_mask")

  def __init__(self, config, tokenizer):
    self.model = base.two_tower_from_config(
        config.model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
        logit_scale_init=config.model.get("logit_scale_init", base.TwoTower.logit_scale_init))

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["image"], batch["text"], batch["text_mask"])
    return variables["params"], {}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # no stochastic layers
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    loss, metrics = losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                     axis_name=axis_name)
    metrics["logit_scale"] = out["logit_scale"]
    return loss, (metrics, state)


class Convirt(Clip):
  """ConVIRT: the CLIP towers trained with :func:`contrastive_jax.losses.convirt_loss`
  (fixed temperature ``config.loss.temperature``, image→text weight ``config.loss.i2t_weight``).
  The model's learnable logit scale is unused."""

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.temperature = config.loss.temperature
    self.i2t_weight = config.loss.i2t_weight

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    loss, metrics = losses.convirt_loss(out["image_emb"], out["text_emb"],
                                        temperature=self.temperature,
                                        i2t_weight=self.i2t_weight, axis_name=axis_name)
    return loss, (metrics, state)

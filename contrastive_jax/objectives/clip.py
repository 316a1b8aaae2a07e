"""CLIP: two towers trained with symmetric InfoNCE (METHODS.md §1.1)."""

from __future__ import annotations

from contrastive_jax import losses
from contrastive_jax.objectives import base


class Clip(base.Split):
  """Image-text contrastive pretraining with CLIP's loss: the memory-lean ring form
  (:func:`contrastive_jax.losses.ring_clip_loss`, equal to ``clip_loss``) for large batches,
  the global view for small ones (``config.loss.ring``, see :func:`base.use_ring`); the ring
  scores the local rows ``config.loss.block_size`` at a time (absent or None: all at once)."""

  batch_keys = ("image", "text", "text_mask")

  def __init__(self, config, tokenizer):
    self.model = base.clip_two_tower(config, tokenizer)
    self.block_size = config.loss.get("block_size") if "loss" in config else None
    self.ring = base.ring_setting(config)
    self.geometry = base.geometry_enabled(config)

  def _clip_loss(self, x, y, scale, axis_name, **kwargs):
    if base.use_ring(self.ring, self.block_size, x.shape[0], axis_name):
      return losses.ring_clip_loss(x, y, scale, block_size=self.block_size,
                                   axis_name=axis_name, **kwargs)
    return losses.clip_loss(x, y, scale, axis_name=axis_name, **kwargs)

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["image"], batch["text"], batch["text_mask"])
    return variables["params"], {}

  def embed(self, params, state, batch):
    del state
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    return {k: out[k] for k in ("image_emb", "text_emb", "logit_scale")}

  def contrast(self, out, state, rng, *, axis_name=None):
    del rng  # no stochastic terms
    loss, metrics = self._clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                    axis_name)
    metrics["logit_scale"] = out["logit_scale"]
    return loss, (self._geometry(metrics, out, axis_name), state)

  def _geometry(self, metrics, out, axis_name):
    """With ``config.metrics.geometry``: ``uniformity`` of the image embeddings and their
    ``alignment`` with the captions' (:func:`base.add_geometry_metrics`)."""
    if not self.geometry:
      return metrics
    return base.add_geometry_metrics(metrics, out["image_emb"], out["text_emb"],
                                     axis_name=axis_name)


class Convirt(Clip):
  """ConVIRT: the CLIP towers trained with ConVIRT's loss (``convirt_loss``, here in its ring
  form): fixed temperature ``config.loss.temperature``, image→text weight
  ``config.loss.i2t_weight``. The model's learnable logit scale is unused."""

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.temperature = config.loss.temperature
    self.i2t_weight = config.loss.i2t_weight

  def contrast(self, out, state, rng, *, axis_name=None):
    del rng
    loss, metrics = self._clip_loss(out["image_emb"], out["text_emb"], 1.0 / self.temperature,
                                    axis_name, i2t_weight=self.i2t_weight)
    return loss, (self._geometry(metrics, out, axis_name), state)

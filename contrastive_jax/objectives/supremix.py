"""SupReMix: supervised contrastive regression with mixtures of embeddings as hard negatives
and hard positives (METHODS.md §2.11), on two image views with a continuous target.

Batch keys ``views`` (two) and ``target`` (``config.data.regression_target`` of the shapes
source: ``"size"``, ``"x"`` or ``"y"`` of the single object; the config keeps single-object
scenes and crops that do not change the target). The loss is
:func:`contrastive_jax.losses.supremix.supremix_loss` on the two views' projections.

``config.loss``: ``temperature``, ``tolerance``, ``hard_negatives``, ``hard_positives``,
``negative_mix``, ``distance_power``, ``count_offset`` (see the loss).
"""

from __future__ import annotations

from contrastive_jax.losses import supremix as supremix_losses
from contrastive_jax.objectives import image_ssl

_HYPER = ("temperature", "tolerance", "hard_negatives", "hard_positives", "negative_mix",
          "distance_power", "count_offset")


class SupReMix(image_ssl.ImageObjective):
  """SupReMix objective (see the module docstring)."""

  batch_keys = ("views", "target")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    num_views = config.data.views.ssl.get("num", 2)
    if num_views < 1:
      raise ValueError(f"SupReMix needs views; config.data.views.ssl.num={num_views}.")
    self.num_views = num_views
    self.hyper = {k: config.loss[k] for k in _HYPER if k in config.loss}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # views come augmented; mixtures are deterministic given the targets
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    z = image_ssl.unflatten(out["proj"], self.num_views)
    loss, metrics = supremix_losses.supremix_loss(z, batch["target"], axis_name=axis_name,
                                                  **self.hyper)
    return loss, (metrics, dict(state, batch_stats=self.sync_state(batch_stats, axis_name)))

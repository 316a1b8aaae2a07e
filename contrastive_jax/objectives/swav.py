"""SwAV: swapped prediction of online Sinkhorn codes over multi-crop views (METHODS.md §1.6).

Batch keys: ``views [B, 2, S, S, C]`` (the two global crops, ``config.data.views.ssl``) and,
with multi-crop, ``crops [B, N, s, s, C]`` (``config.data.views.multicrop``). Each resolution
goes through the backbone and projector as one batch (the running BatchNorm statistics are
threaded through both passes); projections are L2-normalised and scored against the
prototypes ``C [K, dim]`` (``params['prototypes']``), giving ``scores [2 + N, B, K]`` for
:func:`contrastive_jax.losses.swav.swav_loss` (codes from the two global crops).

Prototypes are kept on the unit sphere and frozen for the first steps by the optimizer:
the config sets ``optimizer.unit_norm = ("prototypes",)`` and ``optimizer.freeze =
{"prototypes": N}`` (:mod:`contrastive_jax.optim`), SwAV's re-normalisation and
``freeze_prototypes_niters``.

``config.loss``: ``num_prototypes`` K, ``temperature`` τ, ``epsilon`` ε,
``sinkhorn_iterations``. Not implemented: the per-device queue for small batches.
"""

from __future__ import annotations

import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses import swav as swav_losses
from contrastive_jax.objectives import image_ssl


class Swav(image_ssl.ImageObjective):
  """SwAV objective (see the module docstring)."""

  def __init__(self, config, tokenizer=None):
    lc = config.loss
    self.num_prototypes = lc.num_prototypes
    super().__init__(config, tokenizer)
    self.multicrop = bool(config.data.views.get("multicrop"))
    self.batch_keys = ("views", "crops") if self.multicrop else ("views",)
    self.temperature = lc.get("temperature", 0.1)
    self.epsilon = lc.get("epsilon", 0.05)
    self.iterations = lc.get("sinkhorn_iterations", 3)
    if "prototypes" not in tuple(config.optimizer.get("unit_norm") or ()):
      raise ValueError("SwAV keeps its prototypes on the unit sphere: set "
                       "config.optimizer.unit_norm=('prototypes',).")

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng
    batch_stats = state["batch_stats"]
    groups = [batch["views"]] + ([batch["crops"]] if self.multicrop else [])
    scores = []
    for views in groups:
      out, batch_stats = self.forward(params, batch_stats, image_ssl.flatten_views(views),
                                      axis_name=axis_name)
      z = image_ssl.unflatten(common.l2_normalize(out["proj"]), views.shape[1])  # [B, V, d]
      scores.append(jnp.einsum("bvd,kd->vbk", z, out["prototypes"]))
    loss, metrics = swav_losses.swav_loss(
        jnp.concatenate(scores, axis=0), num_assign_crops=2, temperature=self.temperature,
        epsilon=self.epsilon, sinkhorn_iterations=self.iterations, axis_name=axis_name)
    return loss, (metrics, dict(state, batch_stats=self.sync_state(batch_stats, axis_name)))

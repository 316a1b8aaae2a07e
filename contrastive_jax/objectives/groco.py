"""GroCo: learning by sorting with group ordering constraints (METHODS.md §1.12), on ``V``
augmented views of each image.

Batch keys: ``views [B, V, S, S, C]`` (``config.data.views.ssl``, ``V ≥ 2``) and, with
multi-crop, ``crops [B, N, s, s, C]`` (``config.data.views.multicrop``): the local crops are
anchors only; the ``V`` global views are the positives
(:func:`contrastive_jax.losses.groco.groco_loss` with ``num_pos_views = V``). Each resolution
goes through the backbone and projector as one batch (SimCLR's global BatchNorm over all
views), the running statistics threaded through both passes.

``config.loss``: ``num_negatives`` (k, reference 10), ``steepness`` (β, 1), ``dist``
(``"cauchy"``), ``stop_gradient`` (True).

:class:`MultiView` (the ``V``-view embedding and loss plumbing) is shared with CACR.
"""

from __future__ import annotations

import jax.numpy as jnp

from contrastive_jax.losses import groco as groco_losses
from contrastive_jax.objectives import image_ssl


class MultiView(image_ssl.ImageObjective):
  """Image objective whose loss reads the projections ``[b, V (+ N), dim]`` of all views.

  Subclasses implement ``contrast(z, axis_name) -> (loss, metrics)``.
  """

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.num_views = config.data.views.ssl.get("num", 2)
    if self.num_views < 2:
      raise ValueError(f"{type(self).__name__} needs at least 2 views; "
                       f"config.data.views.ssl.num={self.num_views}.")
    self.multicrop = bool(config.data.views.get("multicrop"))
    self.batch_keys = ("views", "crops") if self.multicrop else ("views",)

  def embed(self, params, state, batch, axis_name):
    """Projections ``[b, V + N, dim]`` (global views first) and the new BatchNorm
    statistics."""
    batch_stats = state["batch_stats"]
    groups = [batch["views"]] + ([batch["crops"]] if self.multicrop else [])
    z = []
    for views in groups:
      out, batch_stats = self.forward(params, batch_stats, image_ssl.flatten_views(views),
                                      axis_name=axis_name)
      z.append(image_ssl.unflatten(out["proj"], views.shape[1]))
    return jnp.concatenate(z, axis=1), self.sync_state(batch_stats, axis_name)

  def contrast(self, z, axis_name):
    raise NotImplementedError

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # the views come augmented from the pipeline
    z, batch_stats = self.embed(params, state, batch, axis_name)
    loss, metrics = self.contrast(z, axis_name)
    return loss, (metrics, dict(state, batch_stats=batch_stats))


class GroCo(MultiView):
  """GroCo's group-ordering BCE on the soft permutations of a sorting network."""

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    lc = config.loss
    self.kwargs = dict(num_negatives=lc.get("num_negatives", 10),
                       steepness=lc.get("steepness", 1.0), dist=lc.get("dist", "cauchy"),
                       stop_gradient=lc.get("stop_gradient", True))
    if self.kwargs["dist"] not in groco_losses.DISTRIBUTIONS:
      raise ValueError(f"config.loss.dist={self.kwargs['dist']!r}; expected one of "
                       f"{groco_losses.DISTRIBUTIONS}.")

  def contrast(self, z, axis_name):
    return groco_losses.groco_loss(z, num_pos_views=self.num_views, axis_name=axis_name,
                                   **self.kwargs)

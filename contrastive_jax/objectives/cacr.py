"""CACR: contrastive attraction and contrastive repulsion (METHODS.md §2.15), on ``V``
augmented views of each image (the reference's in-batch small-scale form; no momentum
encoder).

Batch key: ``views [B, V, S, S, C]`` (``config.data.views.ssl``, ``V ≥ 2``; the reference
uses 5 views; with 2 views each query has a single positive and its attraction weight is 1;
with ``config.data.views.multicrop`` the crops join as further views).
All views go through the backbone and projector as one batch (global BatchNorm);
:func:`contrastive_jax.losses.cacr.cacr_loss` scores the projections.

``config.loss``: ``alpha``, ``beta`` (weights of attraction / repulsion, 1 / 1), ``t_pos``
(t⁺, 1.0), ``t_neg`` (t⁻, 0.9 on CIFAR-10), ``stop_gradient_weights`` (True).
"""

from __future__ import annotations

from contrastive_jax.losses import cacr as cacr_losses
from contrastive_jax.objectives.groco import MultiView

_HYPER = ("alpha", "beta", "t_pos", "t_neg", "stop_gradient_weights")


class Cacr(MultiView):
  """CACR objective (see the module docstring)."""

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.kwargs = {k: config.loss[k] for k in _HYPER if k in config.loss}

  def contrast(self, z, axis_name):
    return cacr_losses.cacr_loss(z, axis_name=axis_name, **self.kwargs)

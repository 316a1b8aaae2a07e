"""Soft contrastive loss for novel category discovery (METHODS.md §2.26, [unverified] details).

Plain NT-Xent repels every other sample, including unlabelled samples of the anchor's own
(novel) class. The soft form replaces the one-hot target by a distribution that gives likely
same-class candidates some of the positive mass (§0.2 with soft ``P̄``):

  ``ℓ_i = −Σ_{j≠i} P_ij log softmax_{j≠i}(ĥ_i·ĥ_j / τ)``,
  ``P_i = (1 − λ)·onehot(i') + λ·Q_i``

over the ``2B`` anchors of two views (``i'`` the anchor's other view, ``j`` ranging over the
``2B − 1`` other embeddings, as in NT-Xent). Our choices (the paper's weighting formula was
not verified):

* ``Q_i = softmax_{j≠i}(sg(ĥ_i·ĥ_j) / τ_t)``: the model's own similarities at a target
  temperature ``τ_t``, under stop-gradient; or, when ``labels`` (pseudo-labels, −1 unknown) are
  given, uniform over the candidates with the anchor's label (its other view included), and the
  one-hot positive for anchors with label −1.
* ``λ = 0`` is exactly NT-Xent; with ``λ = 1`` and ``τ_t = τ`` the target equals the model's
  distribution, so the loss is its entropy and its gradient is zero (a fixed point).

Distributed form (pattern L): local anchors against both views all-gathered with gradient;
the targets are computed from the same (gradient-free) logits.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.simclr import _MASKED, nt_xent_logits


def soft_targets(logits, positives, *, weight, target_temperature, temperature, labels=None,
                 axis_name=None):
  """``P`` float32 ``[2b, 2B]`` (rows sum to 1, zero on the anchor's own column).

  ``logits``/``positives`` from :func:`nt_xent_logits` (scaled by ``1/temperature``);
  ``labels``: optional int ``[b]`` pseudo-labels of the local pairs (−1 unknown).
  """
  valid = logits > _MASKED / 2
  hard = jax.nn.one_hot(positives, logits.shape[1], dtype=jnp.float32)
  if labels is None:
    sims = jax.lax.stop_gradient(logits) * (temperature / target_temperature)
    soft = jax.nn.softmax(jnp.where(valid, sims, _MASKED), axis=1)
  else:
    row_labels = jnp.concatenate([labels, labels])
    col = common.all_gather_rows(labels, axis_name)
    col_labels = jnp.concatenate([col, col])
    same = valid & (row_labels[:, None] == col_labels[None, :]) & (row_labels[:, None] >= 0)
    same = same | (hard > 0)
    soft = same / jnp.sum(same, axis=1, keepdims=True)
  return (1.0 - weight) * hard + weight * soft


def soft_contrastive_loss(z1, z2, temperature=0.1, *, weight=0.5,
                          target_temperature: Optional[float] = None, labels=None,
                          axis_name=None):
  """Soft-target NT-Xent over the global batch (see the module docstring).

  Args:
    z1: ``[b, D]`` first-view embeddings, any float dtype (local shard when ``axis_name`` is
      given); normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` of the model's logits.
    weight: ``λ ∈ [0, 1]``, the mass moved from the hard positive to the soft targets.
    target_temperature: ``τ_t`` of the similarity targets (None: ``τ``); ignored with labels.
    labels: optional int ``[b]`` pseudo-labels of the pairs (−1: unknown).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch mean over the ``2B`` anchors, identical on
    every device; ``metrics``: ``acc`` (positive logit is the row's highest), ``pos_logit``,
    ``target_entropy`` (mean entropy of the targets ``P``).
  """
  tau_t = temperature if target_temperature is None else target_temperature
  logits, positives = nt_xent_logits(z1, z2, temperature, axis_name=axis_name)
  two_b = logits.shape[1]
  targets = soft_targets(logits, positives, weight=weight, target_temperature=tau_t,
                         temperature=temperature, labels=labels, axis_name=axis_name)
  log_p = jax.nn.log_softmax(logits, axis=1)
  xent = -jnp.sum(jnp.where(targets > 0, targets * log_p, 0.0), axis=1)
  loss = common.global_sum(jnp.sum(xent), axis_name) / two_b

  pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  hit = (jnp.argmax(logits, axis=1) == positives).astype(jnp.float32)
  entropy = -jnp.sum(jnp.where(targets > 0, targets * jnp.log(jnp.maximum(targets, 1e-30)),
                               0.0), axis=1)
  metrics = {
      "acc": common.global_sum(jnp.sum(hit), axis_name) / two_b,
      "pos_logit": common.global_sum(jnp.sum(pos), axis_name) / two_b,
      "target_entropy": common.global_sum(jnp.sum(entropy), axis_name) / two_b,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

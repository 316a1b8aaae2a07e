"""Hydra / SimLAP: contrastive learning from arbitrary pairs through label-pair gated
subspaces (Wu et al., 2024, "Rethinking Positive Pairs in Contrastive Learning"),
METHODS.md §2.5.

Every anchor ``i`` (view 1) comes with a partner label ``y'_i`` and a gate ``g_i ∈ (0, 1)^d``
(computed by the objective from the label pair ``(y_i, y'_i)``). Its logits against the
global view-2 batch are ``Z_in = s · (ẑ¹_i ⊙ g_i ⊙ g_i) · ẑ²_n``; its positives are the ``n``
with ``y_n = y'_i``; the denominator leaves out every ``n`` with ``y_n ∈ {y_i, y'_i}``, and each
positive is contrasted with the remaining negatives only::

  ℓ_ip = log(exp Z_ip + Σ_{n : y_n ∉ {y_i, y'_i}} exp Z_in) − Z_ip,     L = Σ_{i,p} ℓ_ip / Σ_i |P_i|

(sum and count over the global batch). The reference centres each row by its detached mean
first; that shift cancels between the two terms, so it is left out. With ``g ≡ 1`` and
``y' = y`` this is a SupCon-style loss between the views; with all labels distinct as well it
is CLIP's image→text cross-entropy.

Labels ``< 0`` (undefined) never match: such an anchor has no positive and such a candidate
is always a negative.

Distributed form (pattern L): view-2 embeddings and labels all-gathered (the embeddings with
gradient), anchors local.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.supcon import MASKED

PARTNER_MODES = ("arbitrary", "identical", "distinct")


def partner_labels(rng, labels, *, mode="arbitrary", num_classes=None):
  """The partner label ``y'`` of every local row.

  Args:
    rng: PRNG key (per device is fine: the partners of a device's rows are its own).
    labels: int ``[b]`` labels, ``-1`` when undefined (kept ``-1``).
    mode: ``"arbitrary"`` (a random permutation of the local rows' labels), ``"identical"``
      (``y' = y``) or ``"distinct"`` (uniform over the ``num_classes − 1`` other classes).
    num_classes: number of classes (``"distinct"`` only).

  Returns:
    int32 ``[b]`` partner labels.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if mode == "identical":
    return labels
  if mode == "arbitrary":
    out = labels[jax.random.permutation(rng, labels.shape[0])]
  elif mode == "distinct":
    if not num_classes or num_classes < 2:
      raise ValueError(f"Hydra partner mode 'distinct' needs num_classes >= 2, got {num_classes}.")
    shift = jax.random.randint(rng, labels.shape, 1, num_classes)
    out = (labels + shift) % num_classes
  else:
    raise ValueError(f"Hydra partner mode {mode!r}; expected one of {PARTNER_MODES}.")
  return jnp.where(labels >= 0, out, -1).astype(jnp.int32)


def hydra_logits(z1, z2, gates, logit_scale, *, axis_name=None):
  """``Z = s · (ẑ¹ ⊙ g²) ẑ²ᵀ`` of the local anchors against the global view-2 batch.

  Args:
    z1: ``[b, d]`` view-1 projections (anchors), any float dtype.
    z2: ``[b, d]`` view-2 projections (gathered with gradient as the candidates).
    gates: ``[b, d]`` gates in ``(0, 1)`` of the anchors.
    logit_scale: scalar ``s`` (already exponentiated).
    axis_name: mapped data axis, or None.

  Returns:
    float32 ``[b, B]`` logits.
  """
  g = gates.astype(jnp.float32)
  anchors = common.l2_normalize(z1) * g * g
  cands = common.all_gather_rows(common.l2_normalize(z2), axis_name)
  return jnp.asarray(logit_scale, jnp.float32) * anchors @ cands.T


def hydra_loss(z1, z2, gates, labels, partners, logit_scale, *, axis_name=None):
  """Hydra's loss over the global batch (module docstring).

  Args:
    z1: ``[b, d]`` view-1 projections (local shard when ``axis_name`` is set).
    z2: ``[b, d]`` view-2 projections of the same examples.
    gates: ``[b, d]`` the anchors' label-pair gates, in ``(0, 1)``.
    labels: int ``[b]`` labels ``y`` (``-1``: undefined).
    partners: int ``[b]`` partner labels ``y'`` (:func:`partner_labels`).
    logit_scale: scalar ``s = exp(θ)``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 global loss (0 when no anchor has a positive), its
    gradient equal to the single-device one; ``metrics``: ``pos_logit`` / ``neg_logit`` (mean
    positive / denominator-negative logit), ``positives`` (mean positives per anchor) and
    ``acc`` (fraction of positive terms that beat every negative of their row).
  """
  logits = hydra_logits(z1, z2, gates, logit_scale, axis_name=axis_name)
  y = jnp.asarray(labels, jnp.int32)
  y2 = jnp.asarray(partners, jnp.int32)
  y_c = common.all_gather_rows(y, axis_name)[None, :]
  labelled = y_c >= 0
  pos = (y_c == y2[:, None]) & (y2[:, None] >= 0) & (y[:, None] >= 0) & labelled
  removed = ((y_c == y[:, None]) | (y_c == y2[:, None])) & labelled
  neg = ~removed
  neg_lse = jax.nn.logsumexp(jnp.where(neg, logits, MASKED), axis=1, keepdims=True)
  ell = jnp.logaddexp(logits, neg_lse) - logits

  def total(x):
    return common.global_sum(jnp.sum(x).astype(jnp.float32), axis_name)

  num_pos = total(pos)
  loss = total(jnp.where(pos, ell, 0.0)) / jnp.maximum(num_pos, 1.0)
  beats = logits > jnp.max(jnp.where(neg, logits, MASKED), axis=1, keepdims=True)
  metrics = {
      "pos_logit": total(jnp.where(pos, logits, 0.0)) / jnp.maximum(num_pos, 1.0),
      "neg_logit": total(jnp.where(neg, logits, 0.0)) / jnp.maximum(total(neg), 1.0),
      "positives": num_pos / common.global_sum(jnp.float32(z1.shape[0]), axis_name),
      "acc": total(pos & beats) / jnp.maximum(num_pos, 1.0),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

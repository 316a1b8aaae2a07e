"""Supervised contrastive loss (SupCon, Khosla et al., 2020) and the generic masked
multi-positive InfoNCE of METHODS.md §0.2, the base of Hydra (§2.5) and SupReMix (§2.11).

Generic form on a logit matrix ``Z`` (anchors × candidates), positives ``P`` and denominator
mask ``V`` (optional per-term weights ``w``, as log weights)::

  denom_i = log Σ_{j : V_ij} w_ij exp(Z_ij)
  ℓ_i     = − Σ_{j : P_ij} (Z_ij − denom_i) / (|P_i| + c)         (SupCon's "L_out")
  L       = mean of ℓ_i over the anchors with |P_i| > 0 (global batch)

SupCon: ``V`` views ``[B, V, D]``; each of the ``V·B`` embeddings is an anchor against the
``V·B − 1`` others; positives are the other views of the same example and every embedding
with the same (non-negative) label. Labels ``-1`` are "undefined": such a row's positives are
its own other views only, so with all labels distinct SupCon is SimCLR's NT-Xent.

Distributed form (pattern L): local anchors ``[V·b, D]`` against every view all-gathered with
gradient (``[V·b, V·B]`` logits); the self-similarity is masked at the anchor's global column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

# Added to masked logits: finite, so fully masked rows could not produce NaN gradients.
MASKED = -1e9


def multi_positive_nce(logits, pos_mask, valid_mask, *, log_weights=None, count_offset=0.0,
                       axis_name=None):
  """The masked multi-positive InfoNCE of the module docstring on local anchor rows.

  Args:
    logits: float32 ``[n, M]`` logits of the local anchors against all candidates.
    pos_mask: bool ``[n, M]``, True on each anchor's positives (numerator terms).
    valid_mask: bool ``[n, M]``, True on the terms of the denominator (positives included
      when they should be, as in SupCon).
    log_weights: optional float32 ``[n, M]`` ``log w_ij`` added to the denominator terms
      only (SupReMix's label-distance weights); None: unit weights.
    count_offset: ``c`` added to the number of positives in the per-anchor mean (0: SupCon;
      1: the SupReMix reference code).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 mean of ``ℓ_i`` over the global anchors with at least
    one positive (0 when none has one); ``metrics``: ``acc`` (fraction of those anchors whose
    highest valid logit is a positive), ``pos_logit`` / ``neg_logit`` (mean positive / valid
    non-positive logit), ``anchors`` (number of anchors with a positive).
  """
  logits = logits.astype(jnp.float32)
  weighted = logits if log_weights is None else logits + log_weights
  denom = jax.nn.logsumexp(jnp.where(valid_mask, weighted, MASKED), axis=1)
  num_pos = jnp.sum(pos_mask, axis=1).astype(jnp.float32)
  has_pos = num_pos > 0
  per_pos = jnp.where(pos_mask, logits - denom[:, None], 0.0)
  count = jnp.where(has_pos, num_pos + count_offset, 1.0)
  ell = jnp.where(has_pos, -jnp.sum(per_pos, axis=1) / count, 0.0)

  def total(x):
    return common.global_sum(jnp.sum(x), axis_name)

  anchors = total(has_pos.astype(jnp.float32))
  loss = total(ell) / jnp.maximum(anchors, 1.0)
  best = jnp.argmax(jnp.where(valid_mask, logits, MASKED), axis=1)
  hit = jnp.take_along_axis(pos_mask, best[:, None], axis=1)[:, 0] & has_pos
  neg_mask = valid_mask & ~pos_mask
  metrics = {
      "acc": total(hit.astype(jnp.float32)) / jnp.maximum(anchors, 1.0),
      "pos_logit": total(jnp.where(pos_mask, logits, 0.0)) / jnp.maximum(total(pos_mask), 1),
      "neg_logit": total(jnp.where(neg_mask, logits, 0.0)) / jnp.maximum(total(neg_mask), 1),
      "anchors": anchors,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def view_candidates(z, *, axis_name=None):
  """Normalised local anchors and all-gathered candidates of a multi-view batch.

  Args:
    z: ``[b, V, D]`` embeddings of ``V`` views of the ``b`` local examples.
    axis_name: mapped data axis, or None.

  Returns:
    ``(anchors, cands, anchor_rows, self_cols)``: float32 ``[V·b, D]`` local anchors in
    view-major order (row ``v·b + i``), float32 ``[V·B, D]`` all views of the global batch
    gathered with gradient (column ``v·B + r``), int32 ``[V·b]`` global example row of each
    anchor and int32 ``[V·b]`` the anchor's own column.
  """
  b, num_views = z.shape[0], z.shape[1]
  z = common.l2_normalize(z)
  anchors = jnp.concatenate([z[:, v] for v in range(num_views)], axis=0)
  gathered = [common.all_gather_rows(z[:, v], axis_name) for v in range(num_views)]
  global_b = gathered[0].shape[0]
  rows = (common.shard_offset(b, axis_name) + jnp.arange(b)).astype(jnp.int32)
  anchor_rows = jnp.tile(rows, num_views)
  self_cols = anchor_rows + global_b * jnp.repeat(jnp.arange(num_views, dtype=jnp.int32), b)
  return anchors, jnp.concatenate(gathered, axis=0), anchor_rows, self_cols


def candidate_rows(global_b: int, num_views: int) -> jax.Array:
  """Global example row of each of the ``V·B`` candidate columns (int32 ``[V·B]``)."""
  return jnp.tile(jnp.arange(global_b, dtype=jnp.int32), num_views)


def supcon_loss(z, labels, *, temperature=0.1, axis_name=None):
  """SupCon (``L_out``) over the global batch: mean over the ``V·B`` anchors.

  Args:
    z: ``[b, V, D]`` projections of ``V ≥ 1`` views (local shard when ``axis_name`` is set),
      any float dtype; normalised inside, in float32.
    labels: int ``[b]`` class labels; ``-1``: undefined (positives = own views only).
    temperature: ``τ`` (logits are cosines divided by it).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` as :func:`multi_positive_nce` (anchors without any positive, e.g. an
    unlabelled single view, are left out of the mean).
  """
  anchors, cands, anchor_rows, self_cols = view_candidates(z, axis_name=axis_name)
  num_views = z.shape[1]
  labels = jnp.asarray(labels, jnp.int32)
  cand_labels = jnp.tile(common.all_gather_rows(labels, axis_name), num_views)
  anchor_labels = jnp.tile(labels, num_views)
  cand_rows = candidate_rows(cands.shape[0] // num_views, num_views)
  logits = (anchors @ cands.T) / temperature
  not_self = jnp.arange(cands.shape[0])[None, :] != self_cols[:, None]
  same = (anchor_labels[:, None] == cand_labels[None, :]) & (anchor_labels[:, None] >= 0)
  pos = (same | (anchor_rows[:, None] == cand_rows[None, :])) & not_self
  return multi_positive_nce(logits, pos, not_self, axis_name=axis_name)

"""Same-cluster negatives against feature suppression (MCL; Zhang et al., ECCV 2024), §2.17.

Multistage contrastive learning (MCL): stage 1 trains an ordinary contrastive model; its
embeddings are clustered. In each later stage the negatives of an anchor are restricted to
samples that fell in the *same* cluster as the anchor in the earlier stages, so the features
those stages already learned cannot tell them apart and new features must be learned. The
final representation concatenates the stages' embeddings (:func:`concat_stages`).

This module holds the loss of one later stage: SimCLR's two-view NT-Xent (§1.7) whose
denominator keeps, besides the positive, only the same-cluster candidates:

  ``ℓ¹_i = −log exp(ĥ¹_i·ĥ²_i/τ) / (exp(ĥ¹_i·ĥ²_i/τ) + Σ_{j ∈ N(i)} exp(ĥ¹_i·ĥ_j/τ))``

over candidates ``ĥ_j`` of both views (``j`` ranging over ``2B`` columns, the anchor itself
excluded), ``N(i) = {j : c_s(j) = c_s(i) for every earlier stage s}`` (the cluster ids of
the example ``j`` belongs to); ``ℓ²`` alike; loss = mean over the ``2B`` anchors.

[unverified] choices (the paper text was not available): negatives are *restricted* to the
same cluster (a mask on in-batch negatives, rather than a sampler that fills the batch from
one cluster); with several earlier stages a negative must share the anchor's cluster in all
of them; the positive stays in the denominator (InfoNCE form). Both views of an example carry
its cluster ids. Properties (tested): one cluster == NT-Xent; singleton clusters give 0 (only
the positive remains); other clusters' embeddings do not change an anchor's term.

Distribution: pattern L (local anchors against all-gathered candidates, with gradient; the
cluster ids are gathered too). Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

_MASKED = -1e9


def same_cluster_mask(cluster_ids, candidate_ids):
  """``[n, m]`` bool: row ``i`` and column ``j`` share the cluster in every stage.

  Args:
    cluster_ids: int ``[n]`` or ``[n, S]`` (one column per earlier stage).
    candidate_ids: int ``[m]`` or ``[m, S]``.
  """
  a = cluster_ids.reshape(cluster_ids.shape[0], -1)
  c = candidate_ids.reshape(candidate_ids.shape[0], -1)
  return jnp.all(a[:, None, :] == c[None, :, :], axis=-1)


def same_cluster_nt_xent_loss(z1, z2, cluster_ids, temperature=0.1, *, axis_name=None):
  """NT-Xent with negatives restricted to the anchor's earlier-stage cluster(s).

  Args:
    z1: ``[b, D]`` first-view embeddings (local rows; any float dtype).
    z2: ``[b, D]`` second-view embeddings, paired row by row with ``z1``.
    cluster_ids: int ``[b]`` or ``[b, S]``: each example's cluster in the ``S`` earlier
      stages (no gradient).
    temperature: ``τ``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: float32 mean over the global ``2B`` anchors (the same on every
    device; exact gradients w.r.t. the local rows); ``metrics``: ``acc`` (the positive beats
    every kept negative), ``pos_logit``, ``neg_logit`` (mean kept negative logit, 0 when none
    is kept), ``negatives`` (mean number of kept negatives per anchor).
  """
  a = jnp.concatenate([common.l2_normalize(z1), common.l2_normalize(z2)], axis=0)
  b = z1.shape[0]
  cands = jnp.concatenate([common.all_gather_rows(a[:b], axis_name),
                           common.all_gather_rows(a[b:], axis_name)], axis=0)
  global_b = cands.shape[0] // 2
  ids = jax.lax.stop_gradient(cluster_ids)
  all_ids = common.all_gather_rows(ids, axis_name)
  anchor_ids = jnp.concatenate([ids, ids], axis=0)
  cand_ids = jnp.concatenate([all_ids, all_ids], axis=0)
  logits = (a @ cands.T) / temperature  # [2b, 2B]
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  own = jnp.concatenate([rows, rows + global_b])
  positives = jnp.concatenate([rows + global_b, rows])
  cols = jnp.arange(2 * global_b)[None, :]
  is_pos = cols == positives[:, None]
  keep_neg = same_cluster_mask(anchor_ids, cand_ids) & (cols != own[:, None]) & ~is_pos
  masked = jnp.where(keep_neg | is_pos, logits, _MASKED)
  pos = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1)
  xent = jax.nn.logsumexp(masked, axis=1) - pos
  total = 2 * global_b
  loss = common.global_sum(jnp.sum(xent), axis_name) / total
  kept = keep_neg.astype(jnp.float32)
  num_neg = common.global_sum(jnp.sum(kept), axis_name)
  neg_max = jnp.max(jnp.where(keep_neg, logits, _MASKED), axis=1)
  metrics = {
      "acc": common.global_sum(jnp.sum((pos > neg_max).astype(jnp.float32)), axis_name) / total,
      "pos_logit": common.global_sum(jnp.sum(pos), axis_name) / total,
      "neg_logit": common.global_sum(jnp.sum(kept * logits), axis_name) / jnp.maximum(num_neg,
                                                                                      1.0),
      "negatives": num_neg / total,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def concat_stages(stage_embeddings):
  """MCL's final representation: the L2-normalised embeddings of every stage, concatenated.

  Args:
    stage_embeddings: sequence of ``[N, D_s]`` arrays, one per stage.

  Returns:
    float32 ``[N, Σ_s D_s]``.
  """
  return jnp.concatenate([common.l2_normalize(e) for e in stage_embeddings], axis=-1)

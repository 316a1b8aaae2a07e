"""Inverse-propensity weighted negatives (the generic piece of DebCSE, 2023), METHODS.md §2.33.

DebCSE removes shortcut biases (e.g. sentence length, lexical overlap) from contrastive pairs by
inverse-propensity weighting: a pair whose *propensity* ``p_ij ∈ (0, 1]`` (how likely the bias
alone makes it a candidate, from surface and semantic similarity) is high counts less. The
propensity model is the caller's; these functions turn propensities into

* self-normalised importance weights ``w_ij = p_ij⁻¹ / mean_{k valid} p_ik⁻¹`` (mean 1 over a
  row's valid entries, 0 elsewhere; propensities floored at ``min_propensity``), used as
  per-term weights of the InfoNCE denominator (§0.2)::

    ℓ_i = log(exp Z_ii + Σ_{j ≠ i} w_ij exp Z_ij) − Z_ii      (unit weights: InfoNCE)

* or a sample of negatives drawn without replacement with probability ``∝ p⁻¹``
  (Gumbel top-k), for a fixed number of negatives per anchor.

No reference code was located (METHODS.md): the propensity model and the exact DebCSE
objective are not reproduced, only this sampling / weighting piece.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.supcon import MASKED


def ipw_weights(propensity, valid_mask, *, min_propensity=1e-3):
  """Self-normalised inverse-propensity weights, mean 1 over each row's valid entries.

  Args:
    propensity: float ``[n, M]`` propensities in ``(0, 1]``.
    valid_mask: bool ``[n, M]``; invalid entries get weight 0.
    min_propensity: floor of the propensities (bounds the weights by ``1/min_propensity``
      before normalisation).

  Returns:
    float32 ``[n, M]`` weights (a row without valid entries is all 0).
  """
  inv = 1.0 / jnp.maximum(jnp.asarray(propensity, jnp.float32), min_propensity)
  inv = jnp.where(valid_mask, inv, 0.0)
  count = jnp.sum(valid_mask, axis=-1, keepdims=True)
  mean = jnp.sum(inv, axis=-1, keepdims=True) / jnp.maximum(count, 1)
  return jnp.where(valid_mask, inv / jnp.where(count > 0, mean, 1.0), 0.0)


def ipw_sample(rng, propensity, valid_mask, num_samples: int, *, min_propensity=1e-3):
  """Draws ``num_samples`` distinct valid columns per row, with probability ``∝ p⁻¹``.

  Gumbel top-k on ``−log p``: the first draw has probability ``p_j⁻¹ / Σ_k p_k⁻¹``; the others
  follow sampling without replacement.

  Args:
    rng: PRNG key.
    propensity: float ``[n, M]`` propensities in ``(0, 1]``.
    valid_mask: bool ``[n, M]``; only valid columns are drawn.
    num_samples: ``k ≤ M`` (static).
    min_propensity: floor of the propensities.

  Returns:
    ``(index, ok)``: int32 ``[n, k]`` columns and bool ``[n, k]``, False where a row has fewer
    than ``k`` valid columns (those indices are arbitrary).
  """
  log_inv = -jnp.log(jnp.maximum(jnp.asarray(propensity, jnp.float32), min_propensity))
  gumbel = jax.random.gumbel(rng, log_inv.shape)
  keys = jnp.where(valid_mask, log_inv + gumbel, MASKED)
  top, index = jax.lax.top_k(keys, num_samples)
  return index.astype(jnp.int32), top > MASKED / 2


def weighted_info_nce(anchors, cands, neg_weights, *, temperature=0.05, axis_name=None):
  """InfoNCE with per-negative weights in the denominator, over the global batch.

  Args:
    anchors: ``[b, D]`` anchor embeddings (local shard when ``axis_name`` is set).
    cands: ``[b, D]`` their positives, row by row; gathered (with gradient) as the candidates.
    neg_weights: float ``[b, B]`` weights of the local anchors' terms against every global
      candidate (e.g. :func:`ipw_weights`; the positive's own column is ignored). Used as
      given: stop their gradient first if they are computed from the embeddings.
    temperature: ``τ`` (cosine logits divided by it).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 mean of ``ℓ_i`` over the ``B`` anchors; ``metrics``:
    ``acc`` (in-batch top-1), ``pos_logit``.
  """
  a = common.l2_normalize(anchors)
  c = common.all_gather_rows(common.l2_normalize(cands), axis_name)
  logits = (a @ c.T) / temperature
  b, global_b = logits.shape
  labels = common.shard_offset(b, axis_name) + jnp.arange(b)
  own = jnp.arange(global_b)[None, :] == labels[:, None]
  pos = jnp.sum(jnp.where(own, logits, 0.0), axis=1)
  w = jnp.where(own, 1.0, jnp.asarray(neg_weights, jnp.float32))
  log_w = jnp.log(jnp.maximum(w, 1e-30))
  terms = jnp.where(w > 0, logits + log_w, MASKED)
  xent = jax.nn.logsumexp(terms, axis=1) - pos
  hit = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)

  def mean(x):
    return common.global_sum(jnp.sum(x), axis_name) / global_b

  metrics = {"acc": mean(hit), "pos_logit": mean(pos)}
  return mean(xent), jax.tree.map(jax.lax.stop_gradient, metrics)

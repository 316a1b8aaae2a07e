"""Wang & Liu's hard contrastive loss (CVPR 2021, METHODS.md §2.1).

NT-Xent (:mod:`contrastive_jax.losses.simclr`) whose denominator keeps only each anchor's
*hard* negatives, those at or above a per-anchor similarity threshold ``s^{(α)}_i``:

  ``ℓ_i = −log exp(s_ii'/τ) / (exp(s_ii'/τ) + Σ_{j : s_ij ≥ s^{(α)}_i} exp(s_ij/τ))``

over the ``2B`` anchors of two views (the positive always stays in the denominator). The
threshold is a statistic of the anchor's ``2B − 2`` negative similarities over the *global*
batch, computed under stop-gradient (METHODS §0.5 item 5).

Choice (the paper's exact quantile definition is [unverified]): ``quantile = α`` keeps the
``k = max(1, ceil((1 − α)(2B − 2)))`` most similar negatives; the threshold is the ``k``-th
largest negative similarity and ties with it are kept. ``α = 0`` keeps every negative and is
exactly NT-Xent; ``k = 1`` keeps only the hardest one (the τ → 0 triplet-like limit of the
paper). The loss is the mean over the ``2B`` anchors.

Distributed form (pattern L): local anchors against both views all-gathered with gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.simclr import _MASKED, nt_xent_logits


def num_hard_negatives(global_batch: int, quantile: float) -> int:
  """``k``: negatives kept per anchor for a global batch of ``B`` pairs (``2B − 2`` negatives)."""
  if not 0.0 <= quantile < 1.0:
    raise ValueError(f"quantile={quantile}; expected 0 <= quantile < 1.")
  negatives = 2 * global_batch - 2
  return max(1, min(negatives, math.ceil((1.0 - quantile) * negatives - 1e-9)))


def hard_info_nce_loss(z1, z2, temperature=0.5, *, quantile=0.0, axis_name=None):
  """Hard contrastive loss over the global batch of two views (see the module docstring).

  Args:
    z1: ``[b, D]`` first-view embeddings, any float dtype (local shard when ``axis_name`` is
      given); normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` (the paper pairs the hard loss with a larger τ, e.g. 0.5).
    quantile: ``α ∈ [0, 1)``, the fraction of each anchor's negatives dropped (the easiest
      ones); 0 is plain NT-Xent.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, with the
    single-device gradient on the concatenated batch; ``metrics``: ``acc`` (positive logit is
    the row's highest), ``pos_logit``, ``hard_neg_logit`` (mean kept negative logit) and
    ``kept_fraction`` (kept negatives / all negatives, > 1 − α only through ties).
  """
  logits, positives = nt_xent_logits(z1, z2, temperature, axis_name=axis_name)
  two_b = logits.shape[1]
  cols = jnp.arange(two_b)[None, :]
  is_pos = cols == positives[:, None]
  negatives = (logits > _MASKED / 2) & ~is_pos
  k = num_hard_negatives(two_b // 2, quantile)
  neg_logits = jax.lax.stop_gradient(jnp.where(negatives, logits, -jnp.inf))
  threshold = jax.lax.top_k(neg_logits, k)[0][:, -1:]  # k-th largest negative, [2b, 1]
  kept = negatives & (neg_logits >= threshold)
  masked = jnp.where(kept | is_pos, logits, _MASKED)
  pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  xent = jax.nn.logsumexp(masked, axis=1) - pos
  loss = common.global_sum(jnp.sum(xent), axis_name) / two_b

  num_kept = common.global_sum(jnp.sum(kept.astype(jnp.float32)), axis_name)
  hit = (jnp.argmax(masked, axis=1) == positives).astype(jnp.float32)
  metrics = {
      "acc": common.global_sum(jnp.sum(hit), axis_name) / two_b,
      "pos_logit": common.global_sum(jnp.sum(pos), axis_name) / two_b,
      "hard_neg_logit": common.global_sum(jnp.sum(jnp.where(kept, logits, 0.0)), axis_name)
                        / jnp.maximum(num_kept, 1.0),
      "kept_fraction": num_kept / max(1.0, float(two_b) * (two_b - 2)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

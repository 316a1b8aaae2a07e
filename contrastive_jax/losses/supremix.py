"""SupReMix: supervised contrastive *regression* with mixtures of embeddings as hard pairs
(Wu et al., 2023, "Mixup Your Own Pairs"), METHODS.md §2.11.

SupCon (:mod:`contrastive_jax.losses.supcon`) on ``V`` views with continuous targets ``y``:
candidate ``j`` is a positive of anchor ``i`` when ``|y_i − y_j| ≤ tol`` (its own other views
always are), a negative otherwise. Two kinds of mixtures of L2-normalised embeddings (mixed,
then re-normalised) join the candidates of every anchor, one of each per negative ``j``:

* **anchor-inclusive** (hard negative): ``m = mix(ẑ_i, ẑ_j; λ)`` with the fixed ratio
  ``λ = negative_mix`` on the anchor, label ``λ y_i + (1 − λ) y_j`` (kept only while that label
  is more than ``tol`` from ``y_i``);
* **anchor-exclusive** (hard positive): ``m = mix(ẑ_j, ẑ_k; λ)`` where ``k`` is the candidate
  nearest to ``y_i`` in label on the *other* side of ``y_i`` from ``j`` (``y_j < y_i < y_k`` or
  ``y_k < y_i < y_j``; ties: the lowest column) and ``λ = (y_i − y_k)/(y_j − y_k)``, so the
  mixed label equals ``y_i``; kept when such a ``k`` exists.

``mix(u, v; λ) = (λu + (1 − λ)v) / ‖λu + (1 − λ)v‖``; its cosine with the anchor follows from
the pairwise cosines (``‖λu + (1−λ)v‖² = λ² + (1−λ)² + 2λ(1−λ)⟨u, v⟩``), so no mixture is
materialised: the logits cost ``O(n·M)`` beyond SupCon's, plus ``[n, 2, M]`` cosines of the two
label-nearest partners. Mixing ratios and partners depend on the targets only (no gradient);
gradients flow through every cosine, to all devices' embeddings (gathered with gradient).

Denominator terms can be weighted by label distance, ``w = (|y_i − y_c| + 1)^(−p)`` (the
reference's ``L1`` option for ``p = 1``; ``c``: the candidate's or mixture's label, so hard
positives get weight 1) and the mean over positives can divide by ``#pos + count_offset``
(the reference uses 1). With no mixtures, ``p = 0``, ``count_offset = 0`` and ``tol = 0``
this is exactly :func:`supcon.supcon_loss` on the targets as labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, supcon

_TINY = 1e-12


def _mix_cosine(lam, s_anchor_u, s_anchor_v, s_uv):
  """Cosine of the anchor with ``mix(u, v; λ)`` from the three pairwise cosines."""
  sq_norm = lam**2 + (1 - lam) ** 2 + 2 * lam * (1 - lam) * s_uv
  return (lam * s_anchor_u + (1 - lam) * s_anchor_v) / jnp.sqrt(jnp.maximum(sq_norm, _TINY))


def _nearest_partner(y_anchor, y_cands, side_mask, lower: bool):
  """Column of the candidate nearest to each anchor's label among ``side_mask``
  (``lower``: the largest label below; else the smallest above); ``(index, exists)``."""
  key = jnp.where(side_mask, y_cands[None, :] if lower else -y_cands[None, :], -jnp.inf)
  return jnp.argmax(key, axis=1), jnp.any(side_mask, axis=1)


def supremix_logits(z, targets, *, temperature=0.1, tolerance=0.0, hard_negatives=True,
                    hard_positives=True, negative_mix=0.5, distance_power=0.0, axis_name=None):
  """Logits, masks and log weights of the local anchors against plain and mixed candidates.

  Args:
    z: ``[b, V, D]`` projections of ``V`` views (local shard); normalised inside, float32.
    targets: float ``[b]`` regression targets.
    temperature, tolerance, hard_negatives, hard_positives, negative_mix, distance_power,
      axis_name: see :func:`supremix_loss`.

  Returns:
    ``(logits, pos_mask, valid_mask, log_weights)``, each ``[V·b, 3·V·B]``: columns are the
    ``V·B`` candidates, then their anchor-inclusive, then their anchor-exclusive mixtures.
  """
  anchors, cands, _, self_cols = supcon.view_candidates(z, axis_name=axis_name)
  num_views, num_cands = z.shape[1], cands.shape[0]
  y = jnp.asarray(targets, jnp.float32)
  y_c = jnp.tile(jax.lax.stop_gradient(common.all_gather_rows(y, axis_name)), num_views)
  y_a = jnp.tile(y, num_views)
  s = anchors @ cands.T  # [n, M] cosines
  not_self = jnp.arange(num_cands)[None, :] != self_cols[:, None]
  diff = y_c[None, :] - y_a[:, None]
  pos = (jnp.abs(diff) <= tolerance) & not_self
  below, above = (diff < -tolerance) & not_self, (diff > tolerance) & not_self
  neg = below | above

  def log_w(distance):
    return -distance_power * jnp.log1p(distance) if distance_power else jnp.zeros_like(distance)

  # Anchor-inclusive mixtures: hard negatives.
  lam = jnp.asarray(negative_mix, jnp.float32)
  hn_logits = _mix_cosine(lam, jnp.ones_like(s), s, s) / temperature
  hn_dist = (1 - lam) * jnp.abs(diff)
  hn_valid = neg & (hn_dist > tolerance) & hard_negatives

  # Anchor-exclusive mixtures: hard positives, partner on the other side of the anchor.
  low_k, has_low = _nearest_partner(y_a, y_c, below, lower=True)
  high_k, has_high = _nearest_partner(y_a, y_c, above, lower=False)
  partners = jnp.stack([low_k, high_k], axis=1)  # [n, 2]
  partner_cos = jnp.einsum("npd,md->npm", cands[partners], cands)  # [n, 2, M]
  partner = jnp.where(above, low_k[:, None], high_k[:, None])  # j above -> partner below
  s_uv = jnp.where(above, partner_cos[:, 0], partner_cos[:, 1])
  s_ak = jnp.take_along_axis(s, partner, axis=1)
  y_k = y_c[partner]
  hp_valid = ((below & has_high[:, None]) | (above & has_low[:, None])) & hard_positives
  # Invalid entries get a harmless ratio: a NaN there would leak into the gradient.
  safe = jnp.where(hp_valid, y_c[None, :] - y_k, 1.0)
  lam_hp = jnp.where(hp_valid, (y_a[:, None] - y_k) / safe, 0.5)
  lam_hp = jax.lax.stop_gradient(jnp.clip(lam_hp, 0.0, 1.0))
  hp_logits = _mix_cosine(lam_hp, s, s_ak, s_uv) / temperature

  logits = jnp.concatenate([s / temperature, hn_logits, hp_logits], axis=1)
  pos_mask = jnp.concatenate([pos, jnp.zeros_like(pos), hp_valid], axis=1)
  valid = jnp.concatenate([not_self, hn_valid, hp_valid], axis=1)
  log_weights = jnp.concatenate(
      [log_w(jnp.abs(diff)), log_w(hn_dist), jnp.zeros_like(s)], axis=1)
  return logits, pos_mask, valid, log_weights


def supremix_loss(z, targets, *, temperature=0.1, tolerance=0.0, hard_negatives=True,
                  hard_positives=True, negative_mix=0.5, distance_power=0.0, count_offset=0.0,
                  axis_name=None):
  """SupReMix over the global batch (module docstring): mean over the ``V·B`` anchors.

  Args:
    z: ``[b, V, D]`` projections of ``V ≥ 1`` views of the local examples (any float dtype;
      normalised inside, in float32).
    targets: float ``[b]`` regression targets of the examples.
    temperature: ``τ``.
    tolerance: label distance up to which two examples are positives (0: equal labels).
    hard_negatives: add the anchor-inclusive mixtures.
    hard_positives: add the anchor-exclusive mixtures.
    negative_mix: ``λ`` on the anchor in the anchor-inclusive mixtures, in ``[0, 1)``.
    distance_power: ``p`` of the denominator weights ``(|Δy| + 1)^(−p)`` (0: unit weights).
    count_offset: added to the number of positives in each anchor's mean (reference: 1).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` as :func:`supcon.multi_positive_nce`, plus ``hard_positives`` and
    ``hard_negatives`` (mean number of each kept per anchor).
  """
  logits, pos, valid, log_w = supremix_logits(
      z, targets, temperature=temperature, tolerance=tolerance, hard_negatives=hard_negatives,
      hard_positives=hard_positives, negative_mix=negative_mix, distance_power=distance_power,
      axis_name=axis_name)
  loss, metrics = supcon.multi_positive_nce(logits, pos, valid, log_weights=log_w,
                                            count_offset=count_offset, axis_name=axis_name)
  m = logits.shape[1] // 3

  def per_anchor(mask):
    total = common.global_sum(jnp.sum(mask).astype(jnp.float32), axis_name)
    return total / common.global_sum(jnp.float32(mask.shape[0]), axis_name)

  metrics["hard_negatives"] = per_anchor(valid[:, m:2 * m])
  metrics["hard_positives"] = per_anchor(valid[:, 2 * m:])
  return loss, metrics

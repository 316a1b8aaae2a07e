"""GroCo: learning by sorting with group ordering constraints (Shvetsova et al., ICCV 2023),
METHODS.md §1.12.

For every anchor view ``a`` and example ``i``, the cosine similarities to the example's other
(positive) views and to the ``k`` most similar other examples of the same view (hardest
negatives over the *global* batch) are pre-sorted within each group and concatenated,
negatives first: ``x_i = [ν_i ; π_i]`` (``n = k + n_p`` values). A differentiable odd-even
sorting network (:func:`diffsort_oddeven`) gives the soft permutation ``P_i`` (``P_i[r, c]``:
how much of input ``r`` lands at ascending position ``c``); ``q^neg_{i,r} = Σ_{c<k} P_i[r, c]``
and ``q^pos_{i,r} = Σ_{c≥k} P_i[r, c]`` are compared by binary cross-entropy with the group
targets ``[r < k]`` / ``[r ≥ k]``. Because each group is already sorted, only positives that
rank below a negative cost anything. The loss is the mean over anchors, ranks and views.

Positives and negatives are under stop-gradient by default (the reference's ``stop_grad``),
so gradients reach the anchor only. Distributed form: the anchor view's embeddings are
all-gathered to pick the hardest negatives, the anchor itself masked at its *global* index;
everything else is per-row, the sums are ``psum``'d. With ``stop_gradient=False`` the gather
carries gradient (``all_gather``'s transpose routes it back), unlike the reference's
``GatherLayer``, which drops remote contributions (§3.3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

# Added to masked similarities: finite, never chosen by the top-k (k ≤ B − 1).
_MASKED = -1e9
DISTRIBUTIONS = ("cauchy", "logistic")


def _swap_probability(v, steepness, dist):
  """``α = F(β v)``: the weight kept by each wire of a comparator whose upper wire exceeds
  the lower one by ``v`` (``F``: Cauchy or logistic CDF)."""
  if dist == "cauchy":
    return jnp.arctan(steepness * v) / math.pi + 0.5
  if dist == "logistic":
    return jax.nn.sigmoid(steepness * v)
  raise ValueError(f"dist={dist!r}; expected one of {DISTRIBUTIONS}.")


def _odd_even_layer(n, shifted):
  """Static partner index and sign of every wire in one layer of the odd-even network.

  Comparators join wires ``(j, j + 1)`` for ``j = shifted, shifted + 2, ...``; an unpaired
  wire is its own partner. ``sign`` is +1 on the lower wire (which receives the minimum),
  −1 on the upper one, 0 when unpaired.
  """
  partner, sign = list(range(n)), [0.0] * n
  for j in range(int(shifted), n - 1, 2):
    partner[j], partner[j + 1] = j + 1, j
    sign[j], sign[j + 1] = 1.0, -1.0
  return jnp.asarray(partner), jnp.asarray(sign, jnp.float32)


def diffsort_oddeven(x, steepness=1.0, dist="cauchy"):
  """Differentiable odd-even transposition sort (Petersen et al.'s diffsort), ascending.

  ``n`` layers of comparators alternate between the pairs ``(0,1),(2,3),...`` and
  ``(1,2),(3,4),...``. A comparator on wires ``(u, w)`` outputs ``min ≈ α u + (1−α) w`` and
  ``max ≈ (1−α) u + α w`` with ``α = F(β (w − u))``, and mixes the same two columns of the
  running permutation matrix (the identity at first) with the same ``α``.

  Args:
    x: float ``[..., n]`` values to sort (computed in float32).
    steepness: ``β``; as ``β → ∞`` (distinct values) the network becomes a hard sort.
    dist: ``"cauchy"`` (``α = arctan(βv)/π + ½``, GroCo's choice) or ``"logistic"``
      (``α = σ(βv)``).

  Returns:
    ``(sorted, perm)``: float32 ``[..., n]`` soft-sorted values and the doubly stochastic
    float32 ``[..., n, n]`` ``perm`` with ``perm[..., r, c]`` the weight of input ``r`` at
    ascending position ``c``; ``sorted = x @ perm``.
  """
  x = x.astype(jnp.float32)
  n = x.shape[-1]
  # Built from ``x`` so that, inside ``shard_map``, the scan carry is device-varying like ``x``.
  perm = jnp.zeros_like(x)[..., None] + jnp.eye(n, dtype=jnp.float32)
  layers = [_odd_even_layer(n, shifted) for shifted in (False, True)]

  def layer(carry, partner, sign):
    x, perm = carry
    other = x[..., partner]
    # For both wires of a comparator, ``sign · (partner − self)`` is upper − lower.
    alpha = _swap_probability(sign * (other - x), steepness, dist)
    x = alpha * x + (1.0 - alpha) * other
    perm = alpha[..., None, :] * perm + (1.0 - alpha[..., None, :]) * perm[..., partner]
    return x, perm

  def two_layers(carry, _):
    return layer(layer(carry, *layers[0]), *layers[1]), None

  # ``n`` layers: ``n // 2`` (even, odd) pairs in a scan (one compiled body for any ``n``).
  carry, _ = jax.lax.scan(two_layers, (x, perm), None, length=n // 2)
  if n % 2:
    carry = layer(carry, *layers[0])
  return carry


def _safe_log(p):
  """``log p`` clamped at −100 as in torch's ``BCELoss``, with a zero (not NaN) gradient at 0."""
  positive = p > 0
  return jnp.where(positive, jnp.maximum(jnp.log(jnp.where(positive, p, 1.0)), -100.0), -100.0)


def group_order_bce(sims, num_negatives, *, steepness=1.0, dist="cauchy"):
  """Per-row GroCo term for pre-ordered similarities ``[negatives ↑ ; positives ↑]``.

  Args:
    sims: float ``[N, n]`` rows of ``k = num_negatives`` ascending negative similarities
      followed by ``n − k`` ascending positive similarities.
    num_negatives: ``k``.
    steepness, dist: see :func:`diffsort_oddeven`.

  Returns:
    float32 ``[N]``: ``½ [BCE(q^pos, t^pos) + BCE(q^neg, t^neg)]`` averaged over the ``n``
    inputs of each row (``q`` clipped to ``[0, 1]``; logs clamped at −100).
  """
  k = num_negatives
  _, perm = diffsort_oddeven(sims, steepness, dist)
  q_neg = jnp.clip(jnp.sum(perm[..., :k], axis=-1), 0.0, 1.0)  # [N, n]
  q_pos = jnp.clip(jnp.sum(perm[..., k:], axis=-1), 0.0, 1.0)
  is_neg = jnp.arange(sims.shape[-1]) < k

  def bce(q, target):
    return -jnp.where(target, _safe_log(q), _safe_log(1.0 - q))

  return 0.5 * jnp.mean(bce(q_pos, ~is_neg) + bce(q_neg, is_neg), axis=-1)


def anchor_similarities(anchor, positives, negatives, num_negatives, self_columns):
  """Pre-ordered similarity rows ``[ν ; π]`` of anchors against given positives / negatives.

  Args:
    anchor: float ``[b, D]`` anchor embeddings.
    positives: float ``[b, n_p, D]`` each anchor's positive embeddings.
    negatives: float ``[B, D]`` candidate negatives (the anchor view, global batch).
    num_negatives: ``k ≤ B − 1`` hardest negatives kept per anchor.
    self_columns: int ``[b]`` column of each anchor itself in ``negatives`` (masked).

  Returns:
    float32 ``[b, k + n_p]``: the ``k`` most similar negatives ascending, then the positive
    similarities ascending (all cosine similarities).
  """
  a = common.l2_normalize(anchor)
  pos = jnp.einsum("bd,bpd->bp", a, common.l2_normalize(positives))
  neg = a @ common.l2_normalize(negatives).T
  neg = jnp.where(jnp.arange(neg.shape[1])[None, :] == self_columns[:, None], _MASKED, neg)
  hardest, _ = jax.lax.top_k(neg, num_negatives)  # descending
  return jnp.concatenate([hardest[:, ::-1], jnp.sort(pos, axis=1)], axis=1)


def groco_loss(z, *, num_negatives=10, steepness=1.0, num_pos_views=None, dist="cauchy",
               stop_gradient=True, axis_name=None):
  """GroCo over the global batch: mean over anchor views, anchors and sorted inputs.

  Args:
    z: float ``[b, V, D]`` projection outputs of ``V ≥ 2`` views per example, any float dtype
      (local shard when ``axis_name`` is set); normalised inside in float32.
    num_negatives: ``k`` hardest negatives per anchor (reference: 10); needs ``k ≤ B − 1``.
    steepness: ``β`` of the sorting network (reference: 1).
    num_pos_views: the first ``P`` views are positives (multi-crop: the global crops; the
      later, local views are anchors only); None: all ``V``. Anchor ``a`` has the positive
      views ``{p < P, p ≠ a}``.
    dist: comparator CDF, ``"cauchy"`` (reference) or ``"logistic"``.
    stop_gradient: positives and negatives as constants (reference) or differentiable.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. the local inputs equals the single-device gradient on the concatenated
    batch; ``metrics`` (means over the anchors of view 0, as the reference logs):
    ``pos_min`` / ``pos_max`` (lowest / highest positive similarity), ``neg_min`` /
    ``neg_max`` (lowest / highest of the ``k`` negatives), ``pos_neg_gap`` (``pos_min −
    neg_max``) and ``sorted_acc`` (fraction of anchors whose every positive beats every
    negative).
  """
  b, num_views = z.shape[:2]
  num_pos = num_views if num_pos_views is None else num_pos_views
  if num_views < 2 or not 2 <= num_pos <= num_views:
    raise ValueError(f"GroCo needs V ≥ 2 views and 2 ≤ num_pos_views ≤ V; got V={num_views},"
                     f" num_pos_views={num_pos_views}.")
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  global_b = b * devices
  if not 1 <= num_negatives <= global_b - 1:
    raise ValueError(f"num_negatives={num_negatives} must lie in [1, B − 1] for the global "
                     f"batch B={global_b}.")
  const = jax.lax.stop_gradient if stop_gradient else (lambda t: t)
  self_columns = common.shard_offset(b, axis_name) + jnp.arange(b)

  rows = {}  # the anchor views' similarity rows, grouped by length (one sort per length)
  for a in range(num_views):
    pos_views = [p for p in range(num_pos) if p != a]
    negatives = common.all_gather_rows(const(z[:, a]), axis_name)
    sims = anchor_similarities(z[:, a], const(z[:, pos_views]), negatives, num_negatives,
                               self_columns)
    rows.setdefault(sims.shape[1], []).append(sims)
    if a == 0:
      first = jax.lax.stop_gradient(sims)
  total = sum(jnp.sum(group_order_bce(jnp.concatenate(group), num_negatives,
                                      steepness=steepness, dist=dist))
              for group in rows.values())
  loss = common.global_sum(total, axis_name) / (global_b * num_views)

  k = num_negatives
  stats = {"pos_min": first[:, k], "pos_max": first[:, -1], "neg_min": first[:, 0],
           "neg_max": first[:, k - 1],
           "sorted_acc": (first[:, k] > first[:, k - 1]).astype(jnp.float32)}
  metrics = {name: common.global_sum(jnp.sum(v), axis_name) / global_b
             for name, v in stats.items()}
  metrics["pos_neg_gap"] = metrics["pos_min"] - metrics["neg_max"]
  return loss, metrics

"""CACR: contrastive attraction and contrastive repulsion (Zheng et al., TMLR 2023),
METHODS.md §2.15, in the in-batch form of the reference's small-scale code.

``V ≥ 2`` views ``ẑ^1..ẑ^V`` (L2-normalised) of each example. Costs are squared Euclidean
distances ``c(u, v) = ‖u − v‖²``.

* Attraction (CA): each view ``x`` of example ``i`` is pulled to its ``V − 1`` other views
  ``m``, weighted by the conditional distribution ``π⁺_m = softmax_m(t⁺ c⁺_m)`` (farther
  positives weigh more): ``L_CA = α · mean_{i, x} Σ_m π⁺_m c⁺_m``.
* Repulsion (CR): for every view pair ``x < y``, query ``ẑ^x_i`` is pushed from the other
  examples' ``ẑ^y_j`` (``j ≠ i``, the global batch), weighted by
  ``π⁻_j = softmax_j(−t⁻ c⁻_j)`` (closer negatives weigh more):
  ``L_CR = −β · mean_{(x, y), i} Σ_j π⁻_j c⁻_j``.

``L = L_CA + L_CR`` (in ``[−4β, 4α]``; it can be negative). ``t⁺ = t⁻ = 0`` gives uniform
weights: plain alignment plus mean-distance repulsion. The weights are importance weights
under stop-gradient by default (the reference's ImageNet code); ``stop_gradient_weights=False``
differentiates through them (its small-scale code).

Distributed form (pattern L): CA is per example; CR scores the local queries against the
other view all-gathered with gradient (``[b, B]`` costs), the positive masked at its *global*
column, and the sums are ``psum``'d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

# Added to masked logits: finite, so a fully masked row could not produce NaN gradients.
_MASKED = -1e9


def _weighted_cost(cost, temperature, valid, stop_gradient_weights):
  """``Σ_j softmax_j(temperature · cost)_j · cost_j`` over the ``valid`` entries of each row."""
  weights = jax.nn.softmax(jnp.where(valid, temperature * cost, _MASKED), axis=-1)
  if stop_gradient_weights:
    weights = jax.lax.stop_gradient(weights)
  return jnp.sum(jnp.where(valid, weights * cost, 0.0), axis=-1)


def attraction_terms(z, t_pos=1.0, *, stop_gradient_weights=True):
  """CA terms ``Σ_m π⁺_m c⁺_m`` of every example and query view.

  Args:
    z: float ``[b, V, D]`` embeddings (normalised inside, float32).
    t_pos: ``t⁺``.
    stop_gradient_weights: see :func:`cacr_loss`.

  Returns:
    ``(terms, costs)``: float32 ``[b, V]`` weighted costs and float32 ``[b, V, V]`` squared
    distances between the views of each example.
  """
  h = common.l2_normalize(z)
  costs = jnp.sum(jnp.square(h[:, :, None, :] - h[:, None, :, :]), axis=-1)
  num_views = z.shape[1]
  valid = ~jnp.eye(num_views, dtype=bool)
  return _weighted_cost(costs, t_pos, valid, stop_gradient_weights), costs


def repulsion_terms(zx, zy, t_neg=1.0, *, stop_gradient_weights=True, axis_name=None):
  """CR terms ``Σ_j π⁻_j c⁻_j`` of the local queries ``ẑ^x_i`` against the global ``ẑ^y_j``.

  Args:
    zx: float ``[b, D]`` query view (local shard when ``axis_name`` is set).
    zy: float ``[b, D]`` the other view, paired row by row with ``zx``.
    t_neg: ``t⁻``.
    stop_gradient_weights: see :func:`cacr_loss`.
    axis_name: mapped data axis, or None.

  Returns:
    ``(terms, costs, valid)``: float32 ``[b]`` weighted costs, float32 ``[b, B]`` squared
    distances to every ``ẑ^y_j`` of the global batch, bool ``[b, B]`` false at the positive.
  """
  hx = common.l2_normalize(zx)
  hy = common.all_gather_rows(common.l2_normalize(zy), axis_name)
  sq_x = jnp.sum(hx * hx, axis=1, keepdims=True)
  sq_y = jnp.sum(hy * hy, axis=1)
  costs = jnp.maximum(sq_x + sq_y[None, :] - 2.0 * hx @ hy.T, 0.0)
  rows = common.shard_offset(zx.shape[0], axis_name) + jnp.arange(zx.shape[0])
  valid = jnp.arange(hy.shape[0])[None, :] != rows[:, None]
  return _weighted_cost(costs, -t_neg, valid, stop_gradient_weights), costs, valid


def cacr_loss(z, *, alpha=1.0, beta=1.0, t_pos=1.0, t_neg=1.0, stop_gradient_weights=True,
              axis_name=None):
  """CACR over the global batch: ``L_CA + L_CR`` (see the module docstring).

  Args:
    z: float ``[b, V, D]`` projection outputs of ``V ≥ 2`` views per example, any float dtype
      (local shard when ``axis_name`` is set); normalised inside in float32.
    alpha, beta: weights of attraction / repulsion (reference: 1, 1).
    t_pos, t_neg: ``t⁺`` / ``t⁻`` of the conditional weights (reference CIFAR-10: 1.0 / 0.9;
      CIFAR-100, STL-10: 1.0 / 2.0); 0: uniform weights.
    stop_gradient_weights: conditional weights as constants (spec) or differentiable.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. the local inputs equals the single-device gradient on the concatenated
    batch (needs a global batch ``B ≥ 2``); ``metrics``: ``ca`` / ``cr`` (the two terms),
    ``pos_cost`` / ``neg_cost`` (unweighted mean squared distance over positive / negative
    pairs) and ``neg_cost_min`` (mean over queries of the nearest negative's cost).
  """
  b, num_views = z.shape[:2]
  if num_views < 2:
    raise ValueError(f"CACR needs at least 2 views per example; got V={num_views}.")
  global_b = b * (1 if axis_name is None else jax.lax.axis_size(axis_name))
  ca_terms, pos_costs = attraction_terms(z, t_pos,
                                         stop_gradient_weights=stop_gradient_weights)
  cr_sum = neg_sum = neg_min = jnp.zeros((), jnp.float32)
  pairs = [(x, y) for x in range(num_views) for y in range(x + 1, num_views)]
  for x, y in pairs:
    terms, costs, valid = repulsion_terms(z[:, x], z[:, y], t_neg,
                                          stop_gradient_weights=stop_gradient_weights,
                                          axis_name=axis_name)
    cr_sum += jnp.sum(terms)
    costs = jax.lax.stop_gradient(costs)
    neg_sum += jnp.sum(jnp.where(valid, costs, 0.0))
    neg_min += jnp.sum(jnp.min(jnp.where(valid, costs, jnp.inf), axis=1))

  def global_mean(total, count):
    return common.global_sum(total, axis_name) / count

  ca = alpha * global_mean(jnp.sum(ca_terms), global_b * num_views)
  cr = -beta * global_mean(cr_sum, global_b * len(pairs))
  off_diagonal = jnp.sum(jax.lax.stop_gradient(pos_costs))  # the diagonal is 0
  metrics = {
      "ca": ca, "cr": cr,
      "pos_cost": global_mean(off_diagonal, global_b * num_views * (num_views - 1)),
      "neg_cost": global_mean(neg_sum, float(global_b) * (global_b - 1) * len(pairs)),
      "neg_cost_min": global_mean(neg_min, global_b * len(pairs)),
  }
  return ca + cr, jax.tree.map(jax.lax.stop_gradient, metrics)

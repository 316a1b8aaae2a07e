"""SBCL: subclass-balancing contrastive learning (Hou et al., ICCV 2023), METHODS.md §2.36.

Two views, all ``2B`` rows are anchors (the SimCLR form of the reference,
``SupConLoss_rank``); features are L2-normalised, ``s_rj = ẑ_r·ẑ_j``; ``r⁺`` is the other
view of ``r``; subclass ids are global (unique across classes, nested in classes).

* subclass term (SupCon over subclasses, temperature ``τ₁``):
  ``ℓ_sub(r) = −mean_{p ∈ P_sub(r)} [s_rp/τ₁ − LSE_{j≠r} s_rj/τ₁]``,
  ``P_sub(r) = {j ≠ r : sub(j) = sub(r)}`` (holds ``r⁺``);
* class term (temperature ``τ₂``, per anchor class when given per class):
  ``ℓ_cls(r) = −mean_{p ∈ P_cls(r)} [s_rp/τ₂ − LSE_{j ∈ D(r)} s_rj/τ₂]``,
  ``P_cls(r) = {r⁺} ∪ {j : class(j) = class(r), sub(j) ≠ sub(r)}``,
  ``D(r) = {r⁺} ∪ {j : sub(j) ≠ sub(r)}``;
* ``L = w_sub · mean_r ℓ_sub + γ · mean_r ℓ_cls``.

The own other view ``r⁺`` is a positive and a candidate of the class term as in the reference
code (SimCLR and MoCo versions); METHODS' formula leaves it out, which would drop the term
when every class is one subclass. With one subclass per class ``ℓ_sub`` is SupCon and
``ℓ_cls`` is an NT-Xent of ``r⁺`` against the other classes.

Subclasses come from per-class k-means on a bank of features (:func:`class_kmeans`): class
``c`` with ``n_c`` bank rows gets ``clip(n_c // size, 1, S)`` subclasses, where ``size`` is
``max(min_c n_c, 10)`` as in the reference (or a fixed target size), so head classes split
into subclasses about as large as the tail classes.

Distribution: pattern L (local anchors against all-gathered columns with gradient; global
indices for the self and partner masks), loss = ``psum`` of local sums / ``2B``.
Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

_NEG = -1e9


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _mean_log_prob(logits, pos, cand):
  """``−mean_{pos} (logits − LSE_{cand} logits)`` per row (0 for rows without positives)."""
  lse = jax.nn.logsumexp(jnp.where(cand, logits, _NEG), axis=1, keepdims=True)
  num = jnp.sum(pos, axis=1)
  total = jnp.sum(jnp.where(pos, logits - lse, 0.0), axis=1)
  return -total / jnp.maximum(num, 1), num


def sbcl_loss(z1, z2, labels, subclasses, *, temperature=0.1, class_temperature=0.12,
              class_weight=0.2, subclass_weight=1.0, axis_name=None):
  """The bi-granularity SBCL loss over the global batch (see the module docstring).

  Args:
    z1, z2: ``[b, D]`` local rows of the two views (any float dtype; float32 inside).
    labels: int ``[b]`` class of each example (≥ 0).
    subclasses: int ``[b]`` global subclass id of each example (same subclass ⇒ same class).
    temperature: ``τ₁`` of the subclass term.
    class_temperature: ``τ₂``: a float, or float ``[C]`` indexed by the anchor's class.
    class_weight: ``γ``.
    subclass_weight: ``w_sub`` (the reference SimCLR code scales by ``τ₁ / 0.07``).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: float32 global-batch loss on every device, exact gradients.
    ``metrics``: ``subclass_loss``, ``class_loss``, ``subclass_positives`` and
    ``class_positives`` (mean positives per anchor).
  """
  b = z1.shape[0]
  big_b = b * _num_shards(axis_name)
  z = jnp.concatenate([common.l2_normalize(z1), common.l2_normalize(z2)])  # [2b, D]
  cands = jnp.concatenate([common.all_gather_rows(z[:b], axis_name),
                           common.all_gather_rows(z[b:], axis_name)])  # [2B, D]
  lab = jnp.concatenate([labels, labels]).astype(jnp.int32)
  sub = jnp.concatenate([subclasses, subclasses]).astype(jnp.int32)
  all_lab = jnp.tile(common.all_gather_rows(labels.astype(jnp.int32), axis_name), 2)
  all_sub = jnp.tile(common.all_gather_rows(subclasses.astype(jnp.int32), axis_name), 2)
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  own = jnp.concatenate([rows, rows + big_b])
  partner = jnp.concatenate([rows + big_b, rows])
  cols = jnp.arange(2 * big_b)
  not_self = cols[None] != own[:, None]
  is_partner = cols[None] == partner[:, None]
  same_sub = sub[:, None] == all_sub[None]
  same_class = lab[:, None] == all_lab[None]

  sims = z @ cands.T
  l_sub, n_sub = _mean_log_prob(sims / temperature, same_sub & not_self, not_self)
  tau2 = jnp.asarray(class_temperature, jnp.float32)
  tau2 = tau2[lab][:, None] if tau2.ndim else tau2
  l_cls, n_cls = _mean_log_prob(sims / tau2, is_partner | (same_class & ~same_sub),
                                is_partner | ~same_sub)
  mean = lambda v: common.global_sum(jnp.sum(v), axis_name) / (2 * big_b)
  sub_loss, class_loss = mean(l_sub), mean(l_cls)
  metrics = {"subclass_loss": sub_loss, "class_loss": class_loss,
             "subclass_positives": mean(n_sub.astype(jnp.float32)),
             "class_positives": mean(n_cls.astype(jnp.float32))}
  return (subclass_weight * sub_loss + class_weight * class_loss,
          jax.tree.map(jax.lax.stop_gradient, metrics))


def subclass_counts(labels, num_classes, max_subclasses, size=None):
  """Subclasses per class: ``clip(n_c // size, 1, S)`` (0 for absent classes).

  Args:
    labels: int ``[N]`` class of each bank row (negative: ignored).
    num_classes: ``C``.
    max_subclasses: ``S`` (static).
    size: target subclass size; None: ``max(min_{c present} n_c, 10)`` (the reference).

  Returns:
    int32 ``[C]``.
  """
  counts = jax.ops.segment_sum(jnp.ones_like(labels), jnp.where(labels >= 0, labels, num_classes),
                               num_segments=num_classes + 1)[:num_classes]
  if size is None:
    smallest = jnp.min(jnp.where(counts > 0, counts, jnp.iinfo(jnp.int32).max))
    size = jnp.maximum(smallest, 10)
  per = jnp.clip(counts // size, 1, max_subclasses)
  return jnp.where(counts > 0, per, 0).astype(jnp.int32)


def _own_class_sims(x, labels, centroids, num_subclasses):
  """Cosine of each row to the active subclass centroids of its own class: ``[N, S]``."""
  c, s, d = centroids.shape
  lab = jnp.clip(labels, 0, c - 1)
  sims = (x @ centroids.reshape(c * s, d).T).reshape(-1, c, s)
  sims = jnp.take_along_axis(sims, lab[:, None, None], axis=1)[:, 0]
  active = jnp.arange(s)[None] < num_subclasses[lab][:, None]
  return jnp.where(active, sims, _NEG)


def nearest_subclass(features, labels, centroids, num_subclasses):
  """Global subclass id ``c·S + s`` of each row: its most cosine-similar active subclass
  centroid of its own class ``c`` (−1 for negative labels; ``c·S`` while a class has one
  subclass). No gradient.

  Args:
    features: ``[n, D]`` rows.
    labels: int ``[n]`` classes.
    centroids: ``[C, S, D]`` (:func:`class_kmeans`).
    num_subclasses: int32 ``[C]`` active subclasses per class.

  Returns:
    int32 ``[n]``.
  """
  x = common.l2_normalize(jax.lax.stop_gradient(features))
  s = centroids.shape[1]
  best = jnp.argmax(_own_class_sims(x, labels, centroids, num_subclasses), axis=1)
  return jnp.where(labels >= 0, labels * s + best, -1).astype(jnp.int32)


def class_kmeans(key, features, labels, num_subclasses, max_subclasses, *, iterations=10):
  """Per-class spherical k-means: each row may only join a subclass of its own class.

  Args:
    key: PRNG key of the initial rows (distinct rows of the class, one per subclass).
    features: ``[N, D]`` rows (no gradient; L2-normalised here).
    labels: int ``[N]`` class of each row (negative: not clustered).
    num_subclasses: int32 ``[C]`` active subclasses per class, at most the class's row count
      (:func:`subclass_counts`).
    max_subclasses: ``S`` (static).
    iterations: Lloyd iterations (cosine assignment, re-normalised means; an empty subclass
      keeps its centroid).

  Returns:
    ``(centroids float32 [C, S, D], subclass int32 [N])``: unit centroids of the active slots
    and each row's global subclass id (:func:`nearest_subclass` with those centroids).
  """
  x = common.l2_normalize(jax.lax.stop_gradient(features))
  n, d = x.shape
  c, s = num_subclasses.shape[0], max_subclasses
  valid = labels >= 0
  member = (labels[None, :] == jnp.arange(c)[:, None]) & valid[None]  # [C, N]
  draw = jax.random.uniform(key, (n,))
  first = jax.lax.top_k(jnp.where(member, draw[None], -1.0), s)[1]  # [C, S] rows of the class
  centroids = x[first]

  def update(_, cent):
    best = jnp.argmax(_own_class_sims(x, labels, cent, num_subclasses), axis=1)
    seg = jnp.where(valid, labels * s + best, c * s)
    sums = jax.ops.segment_sum(x, seg, num_segments=c * s + 1)[:-1].reshape(c, s, d)
    counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), seg,
                                 num_segments=c * s + 1)[:-1].reshape(c, s, 1)
    return jnp.where(counts > 0, common.l2_normalize(sums), cent)

  centroids = jax.lax.fori_loop(0, iterations, update, centroids)
  return centroids, nearest_subclass(x, labels, centroids, num_subclasses)

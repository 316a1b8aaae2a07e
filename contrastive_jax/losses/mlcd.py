"""MLCD: multi-label cluster discrimination (An et al., ECCV 2024), METHODS.md §1.13.

Each image has a set ``Ω⁺`` of positive classes (its ``l`` nearest cluster centres) and is
scored against class centres ``W [K, D]``: ``c_k = s · (x̂·ŵ_k − m·[k ∈ Ω⁺])``. Positive and
negative classes are separated instead of competing in one softmax:

  ``ℓ = log(1 + Σ_{k∈Ω⁺} e^{−c_k}) + log(1 + Σ_{k∈Ω⁻} e^{c_k})``,  ``L = mean over images``.

``Ω⁻`` is every *valid* class that is not positive; ``valid_mask`` samples negatives
(PartialFC-style, :func:`sample_classes`).

Two distributed forms, equal in value and gradients to one device on the whole batch:

* rows sharded (``axis_name``): local rows × all classes; the loss is the ``psum`` of local
  sums over the global batch;
* classes sharded (``class_axis_name``; :func:`mlcd_loss` with ``shard_classes=True``):
  the embeddings are all-gathered with gradient and each device scores every row against its
  ``K/W`` slice of the centres; both log-sum-exps run over the class shards (``pmax`` of the
  shift, ``psum`` of the shifted sums), and the gradient of each slice is exact.

Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

_NEG = -1e9  # finite "minus infinity" for masked entries


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _log1p_sum_exp(x, mask, class_axis_name):
  """``log(1 + Σ_{k: mask} e^{x_k})`` per row, classes split over ``class_axis_name``.

  Args:
    x: float32 ``[n, K_local]``.
    mask: bool ``[n, K_local]``.
    class_axis_name: mapped axis the class columns are split over, or None.

  Returns:
    float32 ``[n]``; 0 for rows without a masked entry.
  """
  x = jnp.where(mask, x, _NEG)
  # The "1" is an extra entry with value 0: include it in the shift.
  shift = jnp.maximum(jax.lax.stop_gradient(jnp.max(x, axis=1)), 0.0)
  if class_axis_name is not None:
    shift = jax.lax.pmax(shift, class_axis_name)
  total = jnp.sum(jnp.where(mask, jnp.exp(x - shift[:, None]), 0.0), axis=1)
  total = common.global_sum(total, class_axis_name)
  return jnp.log(total + jnp.exp(-shift)) + shift


def multilabel_pos_neg_loss(scores, pos_mask, valid_mask=None, *, axis_name=None,
                            class_axis_name=None):
  """The MLCD / ZLPR multi-label loss on scaled class scores.

  Args:
    scores: float ``[n, K_local]`` scaled scores ``c`` (any float dtype; float32 inside).
      Rows are this device's rows when ``axis_name`` is given; columns are this device's
      classes when ``class_axis_name`` is given.
    pos_mask: bool ``[n, K_local]``, True on each row's positive classes ``Ω⁺``.
    valid_mask: bool ``[n, K_local]`` or ``[K_local]`` (broadcast over rows): classes that
      enter the loss (sampled negatives; positives always count). None: all.
    axis_name: mapped axis the rows are split over, or None.
    class_axis_name: mapped axis the classes are split over, or None. Must differ from
      ``axis_name`` (with one mesh axis, gather the rows and set only this one).

  Returns:
    ``(loss, metrics)``: float32 mean of ``ℓ`` over the global rows, identical on every
    device, with exact gradients w.r.t. the local scores. ``metrics``: ``pos_loss`` and
    ``neg_loss`` (the two terms' means), ``pos_score`` / ``neg_score`` (mean scaled score of
    positive / valid negative entries), ``num_positives`` (mean ``|Ω⁺|``) and ``top1_positive``
    (fraction of rows whose best valid class is a positive).
  """
  if axis_name is not None and axis_name == class_axis_name:
    raise ValueError("axis_name and class_axis_name must differ: gather the rows to split "
                     "the classes over the same axis.")
  s = scores.astype(jnp.float32)
  pos = pos_mask.astype(bool)
  valid = jnp.ones_like(pos) if valid_mask is None else jnp.broadcast_to(valid_mask, pos.shape)
  neg = valid.astype(bool) & ~pos
  pos_term = _log1p_sum_exp(-s, pos, class_axis_name)
  neg_term = _log1p_sum_exp(s, neg, class_axis_name)

  rows = s.shape[0] * _num_shards(axis_name)
  row_mean = lambda v: common.global_sum(jnp.sum(v), axis_name) / rows
  loss = row_mean(pos_term + neg_term)

  def class_sum(v):
    return common.global_sum(common.global_sum(jnp.sum(v), class_axis_name), axis_name)

  sg = jax.lax.stop_gradient(s)
  n_pos, n_neg = class_sum(pos), class_sum(neg)
  best_pos = jnp.max(jnp.where(pos, sg, _NEG), axis=1)
  best_neg = jnp.max(jnp.where(neg, sg, _NEG), axis=1)
  if class_axis_name is not None:
    best_pos = jax.lax.pmax(best_pos, class_axis_name)
    best_neg = jax.lax.pmax(best_neg, class_axis_name)
  metrics = {
      "pos_loss": row_mean(pos_term), "neg_loss": row_mean(neg_term),
      "pos_score": class_sum(jnp.where(pos, sg, 0.0)) / jnp.maximum(n_pos, 1.0),
      "neg_score": class_sum(jnp.where(neg, sg, 0.0)) / jnp.maximum(n_neg, 1.0),
      "num_positives": n_pos / rows,
      "top1_positive": row_mean((best_pos > best_neg).astype(jnp.float32)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def nearest_centres(features, centres, num_positive):
  """Indices of the ``l`` centres most cosine-similar to each row (no gradient).

  Args:
    features: ``[n, D]`` rows (any float dtype).
    centres: ``[K, D]`` cluster centres (K ≥ l).
    num_positive: ``l`` (static).

  Returns:
    int32 ``[n, l]`` global class indices, best first (ties: lower index).
  """
  x = common.l2_normalize(jax.lax.stop_gradient(features))
  c = common.l2_normalize(jax.lax.stop_gradient(centres))
  return jax.lax.top_k(x @ c.T, num_positive)[1].astype(jnp.int32)


def label_mask(labels, num_local_classes, *, class_axis_name=None):
  """Routes global positive class indices to the shard that owns them.

  Args:
    labels: int ``[n, l]`` global class indices (negative: padding, ignored).
    num_local_classes: classes per shard ``K_local`` (all ``K`` when unsharded).
    class_axis_name: mapped axis the classes are split over (device ``r`` owns classes
      ``[r·K_local, (r+1)·K_local)``), or None.

  Returns:
    bool ``[n, K_local]``: True where this shard's class is one of the row's labels.
  """
  local = labels - common.shard_offset(num_local_classes, class_axis_name)
  local = jnp.where((labels >= 0) & (local >= 0) & (local < num_local_classes), local,
                    num_local_classes)  # out of range: dropped by the scatter
  rows = jnp.broadcast_to(jnp.arange(labels.shape[0])[:, None], labels.shape)
  return jnp.zeros((labels.shape[0], num_local_classes), bool).at[rows, local].set(
      True, mode="drop")


def sample_classes(rng, labels, num_classes, ratio, *, axis_name=None):
  """PartialFC's class sample: every positive of the global batch plus each other class with
  probability ``ratio`` (the same draw on every device).

  Args:
    rng: PRNG key, identical on every device.
    labels: int ``[n, l]`` global positive indices of the local rows (negative: padding).
    num_classes: ``K``.
    ratio: sampling probability of a non-positive class (1: all classes).
    axis_name: mapped axis the rows are split over, or None.

  Returns:
    bool ``[K]``, identical on every device.
  """
  if ratio >= 1.0:
    return jnp.ones((num_classes,), bool)
  flat = jnp.where(labels >= 0, labels, num_classes).reshape(-1)
  positive = jnp.zeros((num_classes,), jnp.int32).at[flat].set(1, mode="drop")
  if axis_name is not None:
    positive = jax.lax.pmax(positive, axis_name)
  return (positive > 0) | (jax.random.uniform(rng, (num_classes,)) < ratio)


def mlcd_loss(embeddings, centres, labels, *, scale=32.0, margin=0.0, class_mask=None,
              shard_classes=False, axis_name=None):
  """MLCD on embeddings and class centres, rows sharded over ``axis_name``.

  Args:
    embeddings: ``[b, D]`` this device's rows (any float dtype; L2-normalised in float32).
    centres: ``[K, D]`` class centres (L2-normalised), identical on every device; with
      ``shard_classes`` each device uses its ``K/W`` slice (``K % W == 0``).
    labels: int ``[b, l]`` global positive class indices of the rows (negative: padding).
    scale: ``s``.
    margin: ``m`` subtracted from positive cosines.
    class_mask: bool ``[K]`` classes in the loss (:func:`sample_classes`), None: all.
    shard_classes: model-parallel classifier over ``axis_name`` (see the module docstring).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` of :func:`multilabel_pos_neg_loss` over the global batch.
  """
  x = common.l2_normalize(embeddings)
  w = common.l2_normalize(centres)
  num_classes = w.shape[0]
  if shard_classes and axis_name is not None:
    x = common.all_gather_rows(x, axis_name)
    labels = common.all_gather_rows(labels, axis_name)
    size = _num_shards(axis_name)
    if num_classes % size:
      raise ValueError(f"{num_classes} classes do not split over {size} devices.")
    k_local = num_classes // size
    start = common.shard_offset(k_local, axis_name)
    w = jax.lax.dynamic_slice_in_dim(w, start, k_local, axis=0)
    if class_mask is not None:
      class_mask = jax.lax.dynamic_slice_in_dim(class_mask, start, k_local, axis=0)
    row_axis, class_axis = None, axis_name
  else:
    k_local, row_axis, class_axis = num_classes, axis_name, None
  pos = label_mask(labels, k_local, class_axis_name=class_axis)
  cos = x @ w.T
  scores = scale * (cos - margin * pos.astype(jnp.float32))
  return multilabel_pos_neg_loss(scores, pos, class_mask, axis_name=row_axis,
                                 class_axis_name=class_axis)

"""Representation-geometry metrics: alignment, uniformity (Wang & Isola, 2020) and tolerance
(Wang & Liu, CVPR 2021), METHODS.md §2.1.

On L2-normalised embeddings (normalised inside, in float32):

* ``alignment(x, y) = mean_i ‖x̂_i − ŷ_i‖^α`` (α = 2): how close positive pairs are (0 when
  identical, 4 for antipodal pairs with α = 2);
* ``uniformity(z) = log mean_{i≠j} exp(−t ‖ẑ_i − ẑ_j‖²)`` (t = 2) over the distinct pairs of the
  *global* batch: 0 when all points coincide, ``−4t`` for an antipodal pair, lower = more uniform;
* ``tolerance(z, labels) = mean_{i≠j, l_i = l_j ≥ 0} ẑ_i·ẑ_j``: mean cosine similarity of the
  distinct same-label pairs (label −1: unlabelled, ignored; 0 when there is no such pair).
  Choice: the mean *over same-label pairs* (the paper's reading as "mean similarity of samples
  of the same class"), not the all-pairs expectation of ``s·1[l_i = l_j]``.

All three are pure, differentiable (they can be used as loss terms, as Wang & Isola do) and
global over ``axis_name``: local rows are scored against all-gathered columns (with gradient,
pattern L), so value and gradient equal the single-device ones on the concatenated batch.
They return a scalar (not ``(loss, metrics)``).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def _pair_mask(b: int, total: int, axis_name, valid=None):
  """``[b, total]`` bool: local row ``i`` vs global column ``j``, ``j ≠`` the row's own global
  index, both valid (``valid``: bool ``[b]`` local flags, or None for all)."""
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  mask = jnp.arange(total)[None, :] != rows[:, None]
  if valid is not None:
    mask &= valid[:, None] & common.all_gather_rows(valid, axis_name)[None, :]
  return mask


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[n, m]`` float32 squared Euclidean distances between the rows of ``a`` and ``b``."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
  return jnp.maximum(sq, 0.0)


def log_mean_gaussian(z: jax.Array, *, t: float = 2.0, valid: Optional[jax.Array] = None,
                      normalize: bool = True, axis_name=None) -> jax.Array:
  """``log mean_{i≠j valid} exp(−t ‖z_i − z_j‖²)`` over the global batch (0 without a valid
  pair). ``normalize=False`` uses the raw (Euclidean) embeddings, e.g. SepCLR's salient space.
  ``valid``: optional bool ``[b]``, the rows taking part."""
  z = common.l2_normalize(z) if normalize else z.astype(jnp.float32)
  cols = common.all_gather_rows(z, axis_name)
  mask = _pair_mask(z.shape[0], cols.shape[0], axis_name, valid)
  return global_log_mean_exp(-t * squared_distances(z, cols), mask, axis_name=axis_name)


def global_log_mean_exp(logits: jax.Array, mask: jax.Array, *, axis_name=None) -> jax.Array:
  """``log mean exp`` of the ``mask``-ed entries of ``logits`` over every device (0 when no
  entry is valid), shifted by their gradient-free global max."""
  logits = jnp.where(mask, logits, -1e30)
  local_max = jax.lax.stop_gradient(jnp.max(logits))
  shift = local_max if axis_name is None else jax.lax.pmax(local_max, axis_name)
  total = common.global_sum(jnp.sum(jnp.where(mask, jnp.exp(logits - shift), 0.0)), axis_name)
  count = common.global_sum(jnp.sum(mask.astype(jnp.float32)), axis_name)
  value = jnp.log(jnp.maximum(total, 1e-30)) + shift - jnp.log(jnp.maximum(count, 1.0))
  return jnp.where(count > 0, value, 0.0)


def uniformity(z: jax.Array, *, t: float = 2.0, axis_name=None) -> jax.Array:
  """Wang & Isola's uniformity ``log mean_{i≠j} exp(−t ‖ẑ_i − ẑ_j‖²)`` of the global batch.

  Args:
    z: ``[b, D]`` embeddings, any float dtype (local shard when ``axis_name`` is given);
      normalised inside.
    t: the Gaussian kernel's scale (2 in the paper).
    axis_name: mapped data axis, or None.

  Returns:
    float32 scalar in ``[−4t, 0]``, identical on every device.
  """
  return log_mean_gaussian(z, t=t, axis_name=axis_name)


def alignment(x: jax.Array, y: jax.Array, *, alpha: float = 2.0, axis_name=None) -> jax.Array:
  """Wang & Isola's alignment ``mean_i ‖x̂_i − ŷ_i‖^α`` over the global batch.

  Args:
    x: ``[b, D]`` embeddings; ``y``: ``[b, D]`` their positives, row by row. Normalised inside.
    alpha: the exponent (2 in the paper).
    axis_name: mapped data axis, or None.

  Returns:
    float32 scalar in ``[0, 2^α]``, identical on every device.
  """
  diff = common.l2_normalize(x) - common.l2_normalize(y)
  sq = jnp.sum(diff * diff, axis=-1)
  # ‖·‖^α = (‖·‖²)^(α/2); the floor keeps the gradient finite at identical pairs for α < 2.
  dist = sq if alpha == 2 else jnp.power(jnp.maximum(sq, 1e-30), alpha / 2.0)
  total = common.global_sum(jnp.sum(dist), axis_name)
  count = common.global_sum(jnp.asarray(x.shape[0], jnp.float32), axis_name)
  return total / count


def tolerance(z: jax.Array, labels: jax.Array, *, axis_name=None) -> jax.Array:
  """Wang & Liu's tolerance: mean cosine similarity of the distinct same-label pairs.

  Args:
    z: ``[b, D]`` embeddings (normalised inside).
    labels: int ``[b]`` class labels; ``-1`` (or any negative) marks an unlabelled row.
    axis_name: mapped data axis, or None.

  Returns:
    float32 scalar in ``[−1, 1]`` (0 when the global batch has no same-label pair).
  """
  z = common.l2_normalize(z)
  cols = common.all_gather_rows(z, axis_name)
  all_labels = common.all_gather_rows(labels, axis_name)
  mask = _pair_mask(z.shape[0], cols.shape[0], axis_name, labels >= 0)
  mask &= labels[:, None] == all_labels[None, :]
  total = common.global_sum(jnp.sum(jnp.where(mask, z @ cols.T, 0.0)), axis_name)
  count = common.global_sum(jnp.sum(mask.astype(jnp.float32)), axis_name)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def geometry_metrics(x: jax.Array, y: jax.Array, labels: Optional[jax.Array] = None, *,
                     axis_name=None) -> Dict[str, jax.Array]:
  """``{"uniformity": uniformity(x), "alignment": alignment(x, y)}`` plus ``"tolerance":
  tolerance(x, labels)`` when ``labels`` is given; stop-gradient, ready to log.

  ``x``: ``[b, D]`` embeddings (images), ``y``: ``[b, D]`` their positives (the other view or
  the caption), ``labels``: optional int ``[b]`` (−1 = unlabelled).
  """
  out = {"uniformity": uniformity(x, axis_name=axis_name),
         "alignment": alignment(x, y, axis_name=axis_name)}
  if labels is not None:
    out["tolerance"] = tolerance(x, labels, axis_name=axis_name)
  return jax.tree.map(jax.lax.stop_gradient, out)

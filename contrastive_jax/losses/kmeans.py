"""Lloyd's k-means on features sharded over devices (METHODS.md §0.6, used by ProtoCLIP §1.4).

Every function works on the local rows when ``axis_name`` is given (inside ``jax.shard_map``
or ``jax.pmap``) and on all rows otherwise; the sharded run gives the same centroids and
assignments as one device on the concatenated rows (up to float summation order):

* assignment to the nearest centroid is local;
* per-cluster sums and counts are ``psum``'d, so every device holds the same centroids;
* initial centroids are ``K`` distinct *global* rows chosen by a key that is the same on
  every device, so 8 shards and 1 device start from the same rows.

Distances are Euclidean and centroids are plain means (not re-normalised), as faiss does
in the ProtoCLIP reference. A cluster that receives no rows in an iteration keeps its
previous centroid (never NaN); ``metrics['empty_clusters']`` counts them after the last
iteration. Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def gather_rows_invariant(x, axis_name=None):
  """All devices' rows ``[W * n, ...]`` as a device-invariant value (no gradient path).

  Unlike ``all_gather`` (whose result is typed device-varying inside ``shard_map``), this
  places the local rows at their global offset in zeros and ``psum``s, so the result can be
  stored in replicated state. Identity when ``axis_name`` is None.
  """
  x = jax.lax.stop_gradient(x)
  if axis_name is None:
    return x
  n = x.shape[0]
  full = jnp.zeros((n * _num_shards(axis_name),) + x.shape[1:], x.dtype)
  start = (common.shard_offset(n, axis_name),) + (0,) * (x.ndim - 1)
  return jax.lax.psum(jax.lax.dynamic_update_slice(full, x, start), axis_name)


def local_rows(x, axis_name=None):
  """This device's contiguous ``1/W`` slice of a replicated ``[N, ...]`` array (N % W == 0);
  the whole array when ``axis_name`` is None."""
  if axis_name is None:
    return x
  size = _num_shards(axis_name)
  if x.shape[0] % size:
    raise ValueError(f"{x.shape[0]} rows do not split over {size} devices.")
  n = x.shape[0] // size
  start = (common.shard_offset(n, axis_name),) + (0,) * (x.ndim - 1)
  return jax.lax.dynamic_slice(x, start, (n,) + x.shape[1:])


def init_centroids(key, features, num_clusters, *, axis_name=None):
  """``K`` distinct global rows of ``features``, chosen by ``key``, as initial centroids.

  Args:
    key: PRNG key, identical on every device.
    features: ``[n, d]`` local rows (the global set is their concatenation over devices,
      ``N = W · n ≥ K`` rows).
    num_clusters: ``K``.
    axis_name: mapped axis the rows are sharded over, or None.

  Returns:
    float32 ``[K, d]``, the same on every device and equal to the single-device pick on the
    concatenated rows.
  """
  features = jax.lax.stop_gradient(features).astype(jnp.float32)
  n = features.shape[0]
  total = n * _num_shards(axis_name)
  if num_clusters > total:
    raise ValueError(f"k-means needs at least K={num_clusters} rows; got {total}.")
  picks = jax.random.choice(key, total, (num_clusters,), replace=False)
  local = picks - common.shard_offset(n, axis_name)
  mine = (local >= 0) & (local < n)
  rows = jnp.where(mine[:, None], features[jnp.clip(local, 0, n - 1)], 0.0)
  return common.global_sum(rows, axis_name)


def nearest_centroid(features, centroids, *, block_size=None):
  """Index and squared Euclidean distance of each row's nearest centroid.

  Args:
    features: ``[n, d]`` rows.
    centroids: ``[K, d]``.
    block_size: rows scored at once (must divide ``n``; None: all), bounding the
      ``[block, K]`` distance matrix in memory.

  Returns:
    ``(assignments int32 [n], sq_dist float32 [n])``; ties go to the lower index.
  """
  x = features.astype(jnp.float32)
  c = centroids.astype(jnp.float32)
  c_sq = jnp.sum(c * c, axis=1)

  def score(rows):
    d2 = jnp.sum(rows * rows, axis=1, keepdims=True) - 2.0 * rows @ c.T + c_sq[None, :]
    idx = jnp.argmin(d2, axis=1).astype(jnp.int32)
    return idx, jnp.maximum(jnp.take_along_axis(d2, idx[:, None], axis=1)[:, 0], 0.0)

  n = x.shape[0]
  if not block_size or block_size >= n or n % block_size:
    return score(x)
  idx, d2 = jax.lax.map(score, x.reshape(n // block_size, block_size, -1))
  return idx.reshape(n), d2.reshape(n)


def cluster_sums(features, assignments, num_clusters, *, axis_name=None):
  """Global per-cluster feature sums ``[K, d]`` and counts ``[K]`` (float32), ``psum``'d."""
  x = features.astype(jnp.float32)
  sums = jax.ops.segment_sum(x, assignments, num_segments=num_clusters)
  counts = jax.ops.segment_sum(jnp.ones_like(x[:, 0]), assignments, num_segments=num_clusters)
  return common.global_sum(sums, axis_name), common.global_sum(counts, axis_name)


def kmeans(features, init_centroids, *, iterations, axis_name=None, block_size=None):
  """Lloyd's k-means (Euclidean, centroids not re-normalised) on sharded rows.

  Each iteration assigns the local rows to the nearest centroid, ``psum``s per-cluster sums
  and counts, and moves every non-empty cluster to the mean of its rows; an empty cluster
  keeps its previous centroid. The returned assignments use the returned centroids.

  Args:
    features: ``[n, d]`` local rows (all rows when ``axis_name`` is None); any float dtype,
      computed in float32. Treated as constants (stop-gradient).
    init_centroids: ``[K, d]`` starting centroids, identical on every device (see
      :func:`init_centroids`).
    iterations: number of Lloyd updates (static).
    axis_name: mapped axis the rows are sharded over, or None.
    block_size: rows scored at once in the assignment step (see :func:`nearest_centroid`).

  Returns:
    ``(centroids float32 [K, d], assignments int32 [n], metrics)``: centroids identical on
    every device; assignments of the local rows; ``metrics`` holds ``inertia`` (global mean
    squared distance to the assigned centroid), ``empty_clusters`` (clusters without rows)
    and ``cluster_perplexity`` (``exp`` of the entropy of the cluster sizes; ``K`` when
    balanced).
  """
  x = jax.lax.stop_gradient(features).astype(jnp.float32)
  num_clusters = init_centroids.shape[0]

  def update(centroids):
    assign, _ = nearest_centroid(x, centroids, block_size=block_size)
    sums, counts = cluster_sums(x, assign, num_clusters, axis_name=axis_name)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where(counts[:, None] > 0, means, centroids)

  centroids = jax.lax.fori_loop(0, iterations, lambda _, c: update(c),
                                jax.lax.stop_gradient(init_centroids).astype(jnp.float32))
  assign, sq_dist = nearest_centroid(x, centroids, block_size=block_size)
  counts = common.global_sum(
      jax.ops.segment_sum(jnp.ones_like(sq_dist), assign, num_segments=num_clusters), axis_name)
  total = jnp.sum(counts)
  probs = counts / total
  entropy = -jnp.sum(jnp.where(counts > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0))
  metrics = {
      "inertia": common.global_sum(jnp.sum(sq_dist), axis_name) / total,
      "empty_clusters": jnp.sum(counts == 0).astype(jnp.float32),
      "cluster_perplexity": jnp.exp(entropy),
  }
  return centroids, assign, metrics

"""BECLR pretraining: the loss and DyCE, the dynamic clustered memory (METHODS.md §1.14).

Loss (on the *enhanced* batch: each view's rows followed by their memory neighbours, rows of
the two views paired by position):

  ``pos(p, z) = −mean_i p̂_i·sg(ẑ_i)``,  ``L_pos = ½ [pos(p¹, z_T²) + pos(p², z_T¹)]``
  ``L_neg = log( mean_r S_r / (2N − 2) )``,  ``S_r = Σ_{j∉{r, r⁺}} exp(ê_r·ê_j / τ_u)``
  over ``E = [z_S¹; z_S²]`` (2N rows, ``r⁺`` the other view of ``r``);
  ``L = L_pos + λ_neg · L_neg``.

On identical embeddings ``L_neg = 1/τ_u`` exactly. Distribution: pattern L — local rows
against all-gathered (with gradient) columns, local sums ``psum``'d, the ``log`` of the
global mean taken last (as a log-sum-exp, so no ``exp`` overflows at small ``τ_u``).

DyCE state (one memory; BECLR keeps three: teacher projections, student predictions,
student projections), a replicated pytree made by :func:`dyce_init`:

  ``bank [M, D]`` (unit rows), ``labels int32 [M]`` (cluster of each row, −1 before the
  first clustering), ``centroids [K, D]``, ``ptr``, ``count`` (rows written, saturating at
  ``M``) and ``clustered`` (int32 0/1).

:func:`dyce_update` enqueues the global batch (gathered, identical on every device) FIFO.
Once the memory is full it is clustered by k-means (:mod:`contrastive_jax.losses.kmeans`,
each device clustering its ``1/W`` slice with ``psum``'d sums); from then on every batch is
assigned to the centroids by a balanced optimal-transport plan (Sinkhorn with cost
``1 − cos``, i.e. plan ∝ ``exp(−C/ε)``: :func:`contrastive_jax.losses.swav.sinkhorn` on the
cosines; the reference exponentiates ``+distance/ε``, which favours *far* prototypes — not
inherited), enqueued with ``argmax`` labels, and every centroid becomes the mean of the
memory rows carrying its label, EMA'd with ``momentum`` (empty clusters keep theirs).
:func:`dyce_neighbours` returns, for each row, the ``k`` most similar memory rows within its
nearest cluster (all memory rows when that cluster has fewer than ``k``).

Depends on jax only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, kmeans, swav

_NEG = -1e9


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


# --- loss ------------------------------------------------------------------------------------

def uniformity_loss(z1, z2, temperature=2.0, *, axis_name=None):
  """BECLR's ``L_neg`` (see the module docstring) over the global batch.

  Args:
    z1, z2: ``[n, D]`` the local rows of the two views (paired by row; any float dtype).
    temperature: ``τ_u``.
    axis_name: mapped data axis, or None.

  Returns:
    float32 scalar, identical on every device; exact gradients w.r.t. both views.
  """
  n = z1.shape[0]
  big_n = n * _num_shards(axis_name)
  e = jnp.concatenate([common.l2_normalize(z1), common.l2_normalize(z2)])  # [2n, D]
  cands = jnp.concatenate([common.all_gather_rows(e[:n], axis_name),
                           common.all_gather_rows(e[n:], axis_name)])  # [2N, D]
  rows = common.shard_offset(n, axis_name) + jnp.arange(n)
  own = jnp.concatenate([rows, rows + big_n])
  partner = jnp.concatenate([rows + big_n, rows])
  cols = jnp.arange(2 * big_n)
  keep = (cols[None] != own[:, None]) & (cols[None] != partner[:, None])
  logits = jnp.where(keep, e @ cands.T / temperature, _NEG)
  shift = jax.lax.stop_gradient(jnp.max(logits))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  total = common.global_sum(jnp.sum(jnp.where(keep, jnp.exp(logits - shift), 0.0)), axis_name)
  return jnp.log(total) + shift - math.log(2 * big_n * (2 * big_n - 2))


def beclr_loss(p1, p2, t1, t2, s1, s2, *, neg_weight=0.1, temperature=2.0, axis_name=None):
  """BECLR's loss ``L_pos + λ_neg · L_neg`` on (enhanced) local rows.

  Args:
    p1, p2: ``[n, D]`` student predictions of the two views.
    t1, t2: ``[n, D]`` teacher projections (stop-gradient is applied here).
    s1, s2: ``[n, D]`` student projections (the ``"SS"`` uniformity configuration).
    neg_weight: ``λ_neg`` (0.1).
    temperature: ``τ_u`` (2.0).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss on every device, exact gradients.
    ``metrics``: ``loss_pos``, ``loss_neg`` and ``std`` (mean over dimensions of the
    unbiased standard deviation of the normalised teacher rows of both views; collapse
    drives it to 0, uniform unit vectors give about ``1/√D``).
  """
  n = p1.shape[0]
  big_n = n * _num_shards(axis_name)
  t1n, t2n = (jax.lax.stop_gradient(common.l2_normalize(t)) for t in (t1, t2))
  align = (jnp.sum(common.l2_normalize(p1) * t2n) + jnp.sum(common.l2_normalize(p2) * t1n))
  loss_pos = -common.global_sum(align, axis_name) / (2 * big_n)
  loss_neg = uniformity_loss(s1, s2, temperature, axis_name=axis_name)
  t = jnp.concatenate([t1n, t2n])
  mean = common.global_sum(jnp.sum(t, axis=0), axis_name) / (2 * big_n)
  var = common.global_sum(jnp.sum((t - mean) ** 2, axis=0), axis_name) / (2 * big_n - 1)
  metrics = {"loss_pos": loss_pos, "loss_neg": loss_neg, "std": jnp.mean(jnp.sqrt(var))}
  return loss_pos + neg_weight * loss_neg, jax.tree.map(jax.lax.stop_gradient, metrics)


# --- DyCE memory -----------------------------------------------------------------------------

def dyce_init(memory_size, dim, num_clusters):
  """An empty DyCE memory (see the module docstring for the fields)."""
  if memory_size < num_clusters:
    raise ValueError(f"DyCE memory of {memory_size} rows cannot hold {num_clusters} clusters.")
  zero = jnp.zeros((), jnp.int32)
  return {"bank": jnp.zeros((memory_size, dim), jnp.float32),
          "labels": jnp.full((memory_size,), -1, jnp.int32),
          "centroids": jnp.zeros((num_clusters, dim), jnp.float32),
          "ptr": zero, "count": zero, "clustered": zero}


def _write(state, rows, labels):
  size = state["bank"].shape[0]
  n = rows.shape[0]
  idx = (state["ptr"] + jnp.arange(n, dtype=jnp.int32)) % size
  return dict(state, bank=state["bank"].at[idx].set(rows), labels=state["labels"].at[idx].set(
      labels), ptr=((state["ptr"] + n) % size).astype(jnp.int32),
              count=jnp.minimum(state["count"] + n, size).astype(jnp.int32))


def _cluster(state, key, iterations, axis_name):
  """k-means on the (replicated) memory; each device clusters its slice, sums are psum'd."""
  k = state["centroids"].shape[0]
  rows = kmeans.local_rows(state["bank"], axis_name)
  init = kmeans.init_centroids(key, rows, k, axis_name=axis_name)
  centroids, assign, _ = kmeans.kmeans(rows, init, iterations=iterations, axis_name=axis_name)
  labels = kmeans.gather_rows_invariant(assign, axis_name)
  return dict(state, centroids=centroids, labels=labels, clustered=jnp.ones((), jnp.int32))


def _assign_and_write(state, rows, epsilon, iterations, momentum):
  """Balanced OT assignment of ``rows`` to the centroids, FIFO write, centroid update."""
  cos = rows @ common.l2_normalize(state["centroids"]).T
  labels = jnp.argmax(swav.sinkhorn(cos, epsilon, iterations), axis=1).astype(jnp.int32)
  state = _write(state, rows, labels)
  k = state["centroids"].shape[0]
  sums = jax.ops.segment_sum(state["bank"], state["labels"], num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(state["labels"], jnp.float32), state["labels"],
                               num_segments=k)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  new = jnp.where(counts[:, None] > 0, (1.0 - momentum) * means + momentum * state["centroids"],
                  state["centroids"])
  return dict(state, centroids=new)


def dyce_update(state, rows, *, key, epsilon=0.05, sinkhorn_iterations=10, momentum=0.0,
                kmeans_iterations=10, recluster=False, axis_name=None):
  """One DyCE step on this device's new rows (no gradient); returns the new memory.

  Order: if the memory is full and not yet clustered (or ``recluster`` is True), k-means
  clusters it first; then a clustered memory takes the batch through the OT assignment and
  the centroid update, while an unclustered one takes it FIFO with label −1.

  Args:
    state: memory from :func:`dyce_init`, identical on every device.
    rows: ``[b, D]`` this device's rows (the global batch is their concatenation over the
      devices in device order, ``W·b ≤ M`` rows); normalised here.
    key: PRNG key of the k-means initialisation, identical on every device.
    epsilon: Sinkhorn ``ε`` of the assignment.
    sinkhorn_iterations: Sinkhorn iterations (10 in BECLR).
    momentum: centroid EMA ``μ`` (0: replace by the mean).
    kmeans_iterations: Lloyd iterations of each clustering.
    recluster: traced bool, re-run k-means on a full memory this step (periodic refresh).
    axis_name: mapped data axis, or None.

  Returns:
    The new memory, identical on every device and equal to the single-device update on the
    concatenated batch.
  """
  rows = kmeans.gather_rows_invariant(common.l2_normalize(rows), axis_name)
  size = state["bank"].shape[0]
  if rows.shape[0] > size:
    raise ValueError(f"DyCE memory of {size} rows cannot take a global batch of "
                     f"{rows.shape[0]} rows.")
  full = state["count"] >= size
  do_cluster = full & ((state["clustered"] == 0) | jnp.asarray(recluster))
  state = jax.lax.cond(do_cluster, lambda s: _cluster(s, key, kmeans_iterations, axis_name),
                       lambda s: s, state)
  return jax.lax.cond(
      state["clustered"] > 0,
      lambda s: _assign_and_write(s, rows, epsilon, sinkhorn_iterations, momentum),
      lambda s: _write(s, rows, jnp.full((rows.shape[0],), -1, jnp.int32)), state)


def dyce_neighbours(state, rows, k):
  """The ``k`` memory rows most cosine-similar to each row within its nearest cluster.

  Args:
    state: a clustered memory (:func:`dyce_update`).
    rows: ``[n, D]`` query rows (any float dtype; no gradient).
    k: neighbours per row (static, ``≤ M``).

  Returns:
    float32 ``[n, k, D]`` memory rows (constants), most similar first. A row whose nearest
    cluster holds fewer than ``k`` memory rows takes its neighbours from the whole memory.
  """
  q = common.l2_normalize(jax.lax.stop_gradient(rows))
  sims = q @ state["bank"].T  # [n, M]
  nearest = jnp.argmax(q @ common.l2_normalize(state["centroids"]).T, axis=1)
  member = state["labels"][None, :] == nearest[:, None]
  enough = jnp.sum(member, axis=1, keepdims=True) >= k
  scores = jnp.where(member | ~enough, sims, _NEG)
  idx = jax.lax.top_k(scores, k)[1]
  return state["bank"][idx]


def enhance(rows, neighbours):
  """``[n, D]`` rows and their ``[n, k, D]`` neighbours -> the enhanced ``[n(1 + k), D]``:
  the rows, then row 0's neighbours, row 1's, ... (the same layout for both views keeps the
  pairs aligned)."""
  return jnp.concatenate([rows.astype(jnp.float32),
                          neighbours.reshape(-1, neighbours.shape[-1])], axis=0)

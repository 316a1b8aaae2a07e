"""Feature Transformation (FT; Zhu et al., ICCV 2021) on a MoCo-v2 queue, METHODS.md §2.10.

FT edits the features of MoCo's logit computation, not the images. With unit queries ``q̂``,
keys ``k̂`` (momentum encoder, stop-gradient) and queue ``Q̂``:

* positive extrapolation: ``λ⁺ = 1 + Beta(α⁺, α⁺) ∈ [1, 2]``,
  ``q' = λ⁺ q̂ + (1 − λ⁺) k̂``, ``k' = λ⁺ k̂ + (1 − λ⁺) q̂`` (the pair is pushed apart: a harder
  positive; the gradient flows through ``q̂`` in both ``q'`` and ``k'``);
* negative interpolation: ``λ⁻ ~ Beta(α⁻, α⁻)``, ``Q' = λ⁻ Q̂ + (1 − λ⁻) Q̂[π]`` with a random
  permutation ``π`` of the queue rows (new, "in-between" negatives);
* optionally ``q', k'`` are re-normalised (the reference's ``postmix_norm``, off in its
  published command); the queue is never re-normalised.

The loss is the cross-entropy with target 0 over ``[q'·k', q'·Q'ᵀ] / τ``. The queue is then
updated with the *original* keys (:func:`contrastive_jax.losses.moco.enqueue`).

``λ⁺`` and ``λ⁻`` are one scalar per step (the reference's published ``dim_mask='none'``) or,
with ``per_dim``, one value per (row, dimension). Draws use a key that is the same on every
device; per-row draws are keyed by ``fold_in(key, global row)``, so 1- and 8-device runs
transform identically. (The reference draws with NumPy per process, so its scalar ``λ`` differs
between GPUs; ours is one per global batch.)

Distribution: queries and keys are local rows, the queue replicated; the loss is ``psum`` of
local sums over the global ``B`` (exact gradients). Depends on jax only.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def sample_lambdas(key, *, num_rows: int, queue_size: int, dim: int,
                   alpha_pos: Optional[float] = 2.0, alpha_neg: Optional[float] = 1.6,
                   extrapolate: bool = True, per_dim: bool = False, row_offset=0):
  """FT's random mixing coefficients and queue permutation.

  Args:
    key: PRNG key, the same on every device.
    num_rows: ``b``, local query rows.
    queue_size: ``K_q``.
    dim: ``D``.
    alpha_pos: ``α⁺`` of ``Beta(α⁺, α⁺)`` (None: no positive transformation, ``λ⁺ = 1``).
    alpha_neg: ``α⁻`` (None: no negative transformation, ``λ⁻ = 1``).
    extrapolate: ``λ⁺ = 1 + Beta`` (the reference's ``expolation_mask``); False: interpolation
      ``λ⁺ = Beta`` in ``[0, 1]``.
    per_dim: one coefficient per (row, dimension) instead of one scalar per step.
    row_offset: global index of the first local row (``common.shard_offset``).

  Returns:
    ``(lam_pos, lam_neg, perm)``: float32 ``lam_pos`` ``[b, D]`` (per_dim) or ``[1, 1]``,
    float32 ``lam_neg`` ``[K_q, D]`` or ``[1, 1]``, int32 ``perm`` ``[K_q]`` (a permutation;
    the identity when ``alpha_neg`` is None).
  """
  k_pos, k_neg, k_perm = jax.random.split(key, 3)
  if alpha_pos is None:
    lam_pos = jnp.ones((1, 1), jnp.float32)
  elif per_dim:
    rows = jnp.asarray(row_offset, jnp.int32) + jnp.arange(num_rows, dtype=jnp.int32)
    lam_pos = jax.vmap(lambda r: jax.random.beta(jax.random.fold_in(k_pos, r), alpha_pos,
                                                 alpha_pos, (dim,)))(rows)
  else:
    lam_pos = jax.random.beta(k_pos, alpha_pos, alpha_pos, (1, 1))
  if alpha_pos is not None and extrapolate:
    lam_pos = lam_pos + 1.0
  if alpha_neg is None:
    return (lam_pos.astype(jnp.float32), jnp.ones((1, 1), jnp.float32),
            jnp.arange(queue_size, dtype=jnp.int32))
  shape = (queue_size, dim) if per_dim else (1, 1)
  lam_neg = jax.random.beta(k_neg, alpha_neg, alpha_neg, shape)
  perm = jax.random.permutation(k_perm, queue_size).astype(jnp.int32)
  return lam_pos.astype(jnp.float32), lam_neg.astype(jnp.float32), perm


def transform_features(q, k, queue_keys, lam_pos, lam_neg, perm, *, renormalize: bool = False):
  """FT's transformed pair and queue for given coefficients (deterministic core).

  Args:
    q: ``[b, D]`` queries (normalised inside; gradient flows).
    k: ``[b, D]`` keys (normalised inside, stop-gradient).
    queue_keys: ``[K_q, D]`` queue (normalised inside, stop-gradient).
    lam_pos: ``λ⁺`` broadcastable to ``[b, D]``.
    lam_neg: ``λ⁻`` broadcastable to ``[K_q, D]``.
    perm: int ``[K_q]`` permutation of the queue rows.
    renormalize: L2-normalise ``q'`` and ``k'`` after mixing.

  Returns:
    float32 ``(q', k', Q')``: ``[b, D]``, ``[b, D]``, ``[K_q, D]`` (``Q'`` without gradient).
    With ``λ⁺ = λ⁻ = 1`` these are ``(q̂, k̂, Q̂)``.
  """
  qn = common.l2_normalize(q)
  kn = jax.lax.stop_gradient(common.l2_normalize(k))
  un = jax.lax.stop_gradient(common.l2_normalize(queue_keys))
  q2 = lam_pos * qn + (1.0 - lam_pos) * kn
  k2 = lam_pos * kn + (1.0 - lam_pos) * qn
  if renormalize:
    q2, k2 = common.l2_normalize(q2), common.l2_normalize(k2)
  u2 = jax.lax.stop_gradient(lam_neg * un + (1.0 - lam_neg) * un[perm])
  return q2, k2, u2


def feature_transform(q, k, queue_keys, key, *, alpha_pos: Optional[float] = 2.0,
                      alpha_neg: Optional[float] = 1.6, extrapolate: bool = True,
                      per_dim: bool = False, renormalize: bool = False, row_offset=0):
  """Draws FT's coefficients with ``key`` and transforms ``(q, k, queue)``.

  See :func:`sample_lambdas` (arguments) and :func:`transform_features` (result).
  """
  lam_pos, lam_neg, perm = sample_lambdas(
      key, num_rows=q.shape[0], queue_size=queue_keys.shape[0], dim=q.shape[1],
      alpha_pos=alpha_pos, alpha_neg=alpha_neg, extrapolate=extrapolate, per_dim=per_dim,
      row_offset=row_offset)
  return transform_features(q, k, queue_keys, lam_pos, lam_neg, perm, renormalize=renormalize)


def ft_moco_loss(q, k, queue_keys, temperature=0.2, *, rng=None,
                 alpha_pos: Optional[float] = 2.0, alpha_neg: Optional[float] = 1.6,
                 extrapolate: bool = True, per_dim: bool = False, renormalize: bool = False,
                 axis_name=None):
  """MoCo-v2 InfoNCE on FT-transformed features.

  Args:
    q: ``[b, D]`` queries (local rows; any float dtype; gradient flows through them).
    k: ``[b, D]`` keys paired with ``q`` (stop-gradient inside).
    queue_keys: ``[K_q, D]`` replicated queue (stop-gradient inside).
    temperature: ``τ`` (MoCo-v2: 0.2).
    rng: PRNG key, the same on every device (None: no transformation, plain MoCo).
    alpha_pos, alpha_neg, extrapolate, per_dim, renormalize: see :func:`sample_lambdas` and
      :func:`transform_features` (defaults: the reference's published command).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: float32 mean over the global batch of the cross-entropy with target 0
    over ``[q'·k', q'·Q'ᵀ] / τ`` (identical on every device, exact gradient w.r.t. local
    ``q``); ``metrics``: ``acc`` (positive logit is the row max), ``pos_logit``, ``neg_logit``
    (mean transformed logits), ``lam_pos``, ``lam_neg`` (mean coefficients).
  """
  b = q.shape[0]
  global_b = b * _num_shards(axis_name)
  if rng is None:
    alpha_pos = alpha_neg = None
    rng = jax.random.key(0)  # unused: both transformations are off
  lam_pos, lam_neg, perm = sample_lambdas(
      rng, num_rows=b, queue_size=queue_keys.shape[0], dim=q.shape[1], alpha_pos=alpha_pos,
      alpha_neg=alpha_neg, extrapolate=extrapolate, per_dim=per_dim,
      row_offset=common.shard_offset(b, axis_name))
  q2, k2, u2 = transform_features(q, k, queue_keys, lam_pos, lam_neg, perm,
                                  renormalize=renormalize)
  pos = jnp.sum(q2 * k2, axis=1, keepdims=True) / temperature  # [b, 1]
  neg = (q2 @ u2.T) / temperature  # [b, K_q]
  logits = jnp.concatenate([pos, neg], axis=1)
  xent = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  loss = common.global_sum(jnp.sum(xent), axis_name) / global_b

  def mean(x):
    return common.global_sum(jnp.sum(x), axis_name) / (global_b * x.shape[1])

  lam_pos_rows = jnp.broadcast_to(lam_pos, (b, lam_pos.shape[1]))
  metrics = {
      "acc": mean((jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)[:, None]),
      "pos_logit": mean(pos),
      "neg_logit": mean(neg),
      "lam_pos": mean(lam_pos_rows),
      "lam_neg": jnp.mean(lam_neg),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

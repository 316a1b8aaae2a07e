"""Shuffled group whitening (WhitenedCSE, Zhuo et al., ACL 2023), METHODS.md §2.34.

``group_whiten`` permutes the ``D`` channels, splits them into ``G`` groups of ``k = D / G``,
centres them over the global batch and whitens every group with its own ZCA transform
``W_g = U diag((λ + ε)^(−½)) Uᵀ`` of the group's (biased) batch covariance ``C_g = U diag(λ) Uᵀ``,
then undoes the permutation. Each whitened group has covariance ``C_g (C_g + ε)^(−1) ≈ I``
over the batch (when ``B ≥ k``); ZCA is the whitening that moves the data least (already
white data is only centred).

``whitenedcse_loss`` is the WhitenedCSE objective on ``V ≥ 2`` views: every view is whitened
with its own random channel shuffle, and view 0 is contrasted with each other view by
InfoNCE (``Σ_{v ≥ 1} InfoNCE(z_0, z_v)``, the paper's two positives for three views). The
dense + tanh head after the whitening belongs to the model and is not part of this loss.

Distributed: batch moments are ``psum``'d (pattern S), so the whitening of a sharded batch
equals that of the concatenated batch in value and gradient; the InfoNCE terms are pattern L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.clip import clip_loss


def group_whiten(z, num_groups, *, perm=None, eps=1e-5, axis_name=None):
  """Group ZCA whitening over the global batch, optionally in a shuffled channel order.

  Args:
    z: ``[b, D]`` embeddings (local shard when ``axis_name`` is set), any float dtype.
    num_groups: ``G``, dividing ``D``.
    perm: optional int ``[D]`` channel permutation (the same on every device); group ``g``
      holds channels ``perm[g·k:(g+1)·k]``. None: contiguous groups.
    eps: added to the covariance eigenvalues.
    axis_name: mapped data axis, or None.

  Returns:
    float32 ``[b, D]`` whitened embeddings in the original channel order.
  """
  x = z.astype(jnp.float32)
  b, dim = x.shape
  if dim % num_groups:
    raise ValueError(f"group_whiten: {num_groups} groups do not divide D={dim}.")
  if perm is not None:
    x = x[:, perm]
  n = common.global_sum(jnp.float32(b), axis_name)
  x = x - common.global_sum(jnp.sum(x, axis=0), axis_name) / n
  groups = x.reshape(b, num_groups, dim // num_groups)
  cov = common.global_sum(jnp.einsum("bgi,bgj->gij", groups, groups), axis_name) / n
  eigvals, eigvecs = jnp.linalg.eigh(cov)
  zca = jnp.einsum("gij,gj,gkj->gik", eigvecs, jax.lax.rsqrt(eigvals + eps), eigvecs)
  out = jnp.einsum("bgi,gij->bgj", groups, zca).reshape(b, dim)
  if perm is not None:
    out = out[:, jnp.argsort(perm)]
  return out


def shuffle_perms(rng, num_views: int, dim: int) -> jax.Array:
  """One random channel permutation per view (int32 ``[V, D]``) from ``rng``."""
  keys = jax.random.split(rng, num_views)
  return jax.vmap(lambda k: jax.random.permutation(k, dim))(keys).astype(jnp.int32)


def whitenedcse_loss(z, rng, *, num_groups, temperature=0.05, eps=1e-5, axis_name=None):
  """WhitenedCSE's loss: shuffled group whitening per view, then ``Σ_{v≥1} InfoNCE(z_0, z_v)``.

  Args:
    z: ``[b, V, D]`` ``V ≥ 2`` views (e.g. dropout passes) of the local examples.
    rng: PRNG key of the shuffles; must be the same on every device.
    num_groups: ``G`` whitening groups (the reference uses 128 on ``D = 768``).
    temperature: ``τ`` of the InfoNCE terms (reference: 0.05).
    eps: see :func:`group_whiten`.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 sum over ``v ≥ 1`` of the global-batch cross-entropy of
    view 0 against view ``v`` (cosine logits ``/ τ``); ``metrics``: ``acc`` (in-batch top-1 of
    view 0 against view 1).
  """
  num_views, dim = z.shape[1], z.shape[2]
  if num_views < 2:
    raise ValueError(f"whitenedcse_loss needs at least 2 views, got {num_views}.")
  perms = shuffle_perms(rng, num_views, dim)
  views = [group_whiten(z[:, v], num_groups, perm=perms[v], eps=eps, axis_name=axis_name)
           for v in range(num_views)]
  loss, metrics = 0.0, {}
  for v in range(1, num_views):
    term, m = clip_loss(views[0], views[v], 1.0 / temperature, i2t_weight=1.0,
                        axis_name=axis_name)
    loss = loss + term
    if v == 1:
      metrics = {"acc": m["i2t_acc"]}
  return loss, metrics

"""Memory-lean SigLIP loss: text shards travel a ``ppermute`` ring, row blocks per device.

SigLIP's loss is a sum over pairs, so it decomposes over (image shard, text shard) blocks
(METHODS.md §1.2, pattern R). With ``softplus(−z) = softplus(z) − z`` the sum is
``Σ_ij softplus(Z_ij) − Σ_i Z_ii``: the ring only accumulates ``Σ softplus(Z)`` and the
positives are the local pairs. A ``jax.custom_vjp`` keeps the (scaled) embeddings and
recomputes each block in the backward pass, where a second ring carries every text's
gradient home. Equal to :func:`contrastive_jax.losses.siglip.siglip_loss` in value, metrics
and gradients (tested on 1, 2 and 8 devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, ring


def _softplus_sum(xs, y, bias, axis_name, block_size):
  """``Σ_{i local, j global} softplus(xs_i · y_j + bias)`` by a ring over the text shards."""
  x_blocks = ring.row_blocks(xs, block_size)

  def ring_step(carry, _):
    total, y_blk = carry

    def block_step(total, x_blk):
      return total + jnp.sum(jax.nn.softplus(x_blk @ y_blk.T + bias)), None

    total, _ = jax.lax.scan(block_step, total, x_blocks)
    return (total, ring.ring_shift(y_blk, axis_name)), None

  init = (jnp.zeros_like(bias), y)
  (total, _), _ = jax.lax.scan(ring_step, init, None, length=ring.axis_size(axis_name))
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_softplus_sum(xs, y, bias, axis_name, block_size):
  return _softplus_sum(xs, y, bias, axis_name, block_size)


def _fwd(xs, y, bias, axis_name, block_size):
  return _softplus_sum(xs, y, bias, axis_name, block_size), (xs, y, bias)


def _bwd(axis_name, block_size, residuals, g):
  """``dZ = g · σ(Z)``, recomputed block by block; texts' gradients travel home."""
  xs, y, bias = residuals
  x_blocks = ring.row_blocks(xs, block_size)

  def ring_step(carry, _):
    gx_blocks, gbias, (y_blk, gy_blk) = carry

    def block_step(carry, x_blk):
      gy_blk, gbias = carry
      dz = g * jax.nn.sigmoid(x_blk @ y_blk.T + bias)
      return (gy_blk + dz.T @ x_blk, gbias + jnp.sum(dz)), dz @ y_blk

    (gy_blk, gbias), gx_new = jax.lax.scan(block_step, (gy_blk, gbias), x_blocks)
    visiting = ring.ring_shift((y_blk, gy_blk), axis_name)
    return (gx_blocks + gx_new, gbias, visiting), None

  init = (jnp.zeros_like(x_blocks), jnp.zeros_like(bias), (y, jnp.zeros_like(y)))
  (gx_blocks, gbias, (_, gy)), _ = jax.lax.scan(ring_step, init, None,
                                                length=ring.axis_size(axis_name))
  return gx_blocks.reshape(xs.shape), gy, gbias


_ring_softplus_sum.defvjp(_fwd, _bwd)


def ring_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, block_size=None,
                     axis_name=None):
  """Pairwise sigmoid loss over the global batch without the global ``B × B`` logits.

  Same contract, value, gradients and metrics as
  :func:`contrastive_jax.losses.siglip.siglip_loss`.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is given).
    text_emb: ``[b, D]`` paired text embeddings.
    logit_scale: scalar ``t = exp(t')``.
    logit_bias: scalar ``b``.
    block_size: local image rows scored at once (must divide ``b``; None: all ``b``).
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)`` with ``i2t_acc``, ``t2i_acc``, ``pos_logit``, ``neg_logit``,
    ``pos_prob``.
  """
  x = common.l2_normalize(image_emb)
  y = common.l2_normalize(text_emb)
  xs = jnp.asarray(logit_scale, jnp.float32) * x
  # A device-varying copy of the bias (its gradient is summed back over devices by JAX).
  bias = jnp.asarray(logit_bias, jnp.float32) + jnp.zeros_like(xs[0, 0])
  b = x.shape[0]
  global_b = b * ring.axis_size(axis_name)
  pos = jnp.sum(xs * y, axis=1) + bias
  local = _ring_softplus_sum(xs, y, bias, axis_name, block_size) - jnp.sum(pos)
  loss = common.global_sum(local, axis_name) / global_b

  # Metrics: the bias does not move an argmax, so CLIP's ring statistics give the hits.
  stop = jax.lax.stop_gradient
  _, _, best_text, best_image = ring.lse_argmax_stats(stop(xs), stop(y), axis_name, block_size)
  metrics = ring.pair_metrics(xs, y, pos, best_text, best_image, axis_name,
                              jnp.asarray(logit_bias, jnp.float32))
  metrics["pos_prob"] = stop(common.global_sum(jnp.sum(jax.nn.sigmoid(pos)), axis_name)
                             / global_b)
  return loss, metrics

"""Memory-lean SigLIP loss: text shards travel a ``ppermute`` ring, row blocks per device.

SigLIP's loss is a sum over pairs, so it decomposes over (image shard, text shard) blocks
(METHODS.md §1.2, pattern R). With ``softplus(−z) = softplus(z) − z`` the sum is
``Σ_ij softplus(Z_ij) − Σ_i Z_ii``: the ring only accumulates ``Σ softplus(Z)`` and the
positives are the local pairs. As in :mod:`contrastive_jax.losses.clip_ring`, no normalised
copy of the embeddings is made: blocks are scored on the raw rows as
``Z_ij = (x_i · y_j) · a_i · b_j + bias`` with ``a_i = t / ||x_i||``, ``b_j = 1 / ||y_j||``.
A ``jax.custom_vjp`` over ``(x, y, a, b, bias)`` keeps only those and recomputes each block in
two backward ring passes (texts travel for the images' gradients, then images for the
texts'), so nothing travels home and the only ``[b, D]`` buffers are the inputs, their
gradients and one visiting shard. Equal to :func:`contrastive_jax.losses.siglip.siglip_loss`
in value, metrics and gradients (tested on 1, 2 and 8 devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, ring


def _softplus_sum(x, y, a, b, bias, axis_name, block_size):
  """``Σ_{i local, j global} softplus((x_i · y_j) a_i b_j + bias)`` by a ring over the text
  shards."""
  x_blocks = ring.row_blocks(x, block_size)
  n, c = x_blocks.shape[:2]
  a_blocks = a.reshape(n, c)

  def step(total, visiting, _):
    y_blk, b_blk = visiting

    def block_step(total, inputs):
      x_blk, a_blk = inputs
      z = ring.dot_t(x_blk, y_blk) * a_blk[:, None] * b_blk[None, :] + bias
      return total + jnp.sum(jax.nn.softplus(z)), None

    total, _ = jax.lax.scan(block_step, total, (x_blocks, a_blocks))
    return total, visiting

  total, _ = ring.ring_fold(step, jnp.zeros_like(bias), (y, b), axis_name)
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_softplus_sum(x, y, a, b, bias, axis_name, block_size):
  return _softplus_sum(x, y, a, b, bias, axis_name, block_size)


def _fwd(x, y, a, b, bias, axis_name, block_size):
  return _softplus_sum(x, y, a, b, bias, axis_name, block_size), (x, y, a, b, bias)


def _bwd(axis_name, block_size, residuals, g):
  """``dZ = g · σ(Z)``, recomputed block by block in two passes (``Z``, then ``Zᵀ``)."""
  x, y, a, b, bias = residuals
  dz = lambda z, rows, cols: g * jax.nn.sigmoid(z + bias)
  gx, ga, dz_sum = ring.scaled_rows_grad(x, a, (), y, b, (), dz, axis_name, block_size)
  # −0.0: see scaled_rows_grad (keeps the two accumulators' initial values apart).
  gy, gb, _ = ring.scaled_rows_grad(y, b, (), x, a, (), dz, axis_name, block_size, zero=-0.0)
  return gx.astype(x.dtype), gy.astype(y.dtype), ga, gb, jnp.sum(dz_sum)


_ring_softplus_sum.defvjp(_fwd, _bwd)


def ring_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, block_size=None,
                     axis_name=None):
  """Pairwise sigmoid loss over the global batch without the global ``B × B`` logits.

  Same contract, value, gradients and metrics as
  :func:`contrastive_jax.losses.siglip.siglip_loss`.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is given); float32
      or bfloat16 (scored in float32; a mixed pair is promoted).
    text_emb: ``[b, D]`` paired text embeddings.
    logit_scale: scalar ``t = exp(t')``.
    logit_bias: scalar ``b``.
    block_size: local image (and, in the backward pass, text) rows scored at once (must
      divide ``b``; None: all ``b``).
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)`` with ``i2t_acc``, ``t2i_acc``, ``pos_logit``, ``neg_logit``,
    ``pos_prob``.
  """
  x, y = ring.float_rows(image_emb, text_emb)
  a = jnp.asarray(logit_scale, jnp.float32) * ring.inverse_norm(x)
  b = ring.inverse_norm(y)
  # A device-varying copy of the bias (its gradient is summed back over devices by JAX).
  bias = jnp.asarray(logit_bias, jnp.float32) + jnp.zeros_like(a[0])
  global_b = x.shape[0] * ring.axis_size(axis_name)
  pos = ring.row_dot(x, y) * a * b + bias
  local = _ring_softplus_sum(x, y, a, b, bias, axis_name, block_size) - jnp.sum(pos)
  loss = common.global_sum(local, axis_name) / global_b

  # Metrics: the bias does not move an argmax, so CLIP's ring statistics give the hits.
  stop = jax.lax.stop_gradient
  x, y, a, b = stop(x), stop(y), stop(a), stop(b)
  _, _, best_text, best_image = ring.scaled_lse_argmax_stats(x, y, a, b, axis_name, block_size)
  metrics = ring.pair_metrics_from_sums(
      pos, ring.scaled_row_sum(x, a, axis_name), ring.scaled_row_sum(y, b, axis_name),
      best_text, best_image, axis_name, jnp.asarray(logit_bias, jnp.float32))
  metrics["pos_prob"] = stop(common.global_sum(jnp.sum(jax.nn.sigmoid(pos)), axis_name)
                             / global_b)
  return loss, metrics

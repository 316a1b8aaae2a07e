"""Ring machinery shared by the memory-lean losses (jax only).

Shards of one modality travel around the devices of the mapped axis with
``jax.lax.ppermute``; each device scores its local rows against the visiting shard in row
blocks, so no device ever holds the global similarity matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def axis_size(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def ring_shift(tree, axis_name):
  """Sends every device's blocks to the next device on the ring (identity on one)."""
  size = axis_size(axis_name)
  if size == 1:
    return tree
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, perm), tree)


def row_blocks(x, block_size):
  """``[b, D] -> [b / c, c, D]`` row blocks (one block when ``c`` does not divide ``b``)."""
  b = x.shape[0]
  c = block_size if block_size and b % block_size == 0 else b
  return x.reshape(b // c, c, x.shape[-1])


def _wins(value, index, best, best_index):
  """True where ``(value, index)`` beats the running ``(best, best_index)``: a higher value, or
  an equal one at a lower global index (a dense ``argmax``'s tie rule, whatever the ring
  order)."""
  return (value > best) | ((value == best) & (index < best_index))


def lse_argmax_stats(xs, y, axis_name, block_size):
  """Ring pass: running LSE/argmax statistics of ``Z = xs @ yᵀ`` over the global batch.

  Returns ``(lse_i2t [b], lse_t2i [b], best_text [b], best_image [b])``; ``best_*`` are the
  global indices of each local row's / local text's highest logit.
  """
  b = xs.shape[0]
  size = axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks = row_blocks(xs, block_size)
  c = x_blocks.shape[1]
  # full_like keeps the inputs' device-varying type, as scan carries inside shard_map need.
  neg_inf = jnp.full_like(xs[:, 0], -jnp.inf)

  def ring_step(carry, k):
    row_lse, row_max, row_arg, visiting = carry
    y_blk, col_lse, col_max, col_arg = visiting
    owner = (me - k) % size  # whose texts are visiting

    def block_step(col_carry, inputs):
      col_lse, col_max, col_arg = col_carry
      x_blk, first_row = inputs
      z = x_blk @ y_blk.T  # [c, b]
      col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(z, axis=0))
      blk_max = jnp.max(z, axis=0)
      blk_arg = me * b + first_row + jnp.argmax(z, axis=0)
      col_arg = jnp.where(_wins(blk_max, blk_arg, col_max, col_arg), blk_arg, col_arg)
      col_max = jnp.maximum(col_max, blk_max)
      return (col_lse, col_max, col_arg), (jax.nn.logsumexp(z, axis=1), jnp.max(z, axis=1),
                                           jnp.argmax(z, axis=1))

    first_rows = jnp.arange(x_blocks.shape[0]) * c
    (col_lse, col_max, col_arg), (lse, mx, arg) = jax.lax.scan(
        block_step, (col_lse, col_max, col_arg), (x_blocks, first_rows))
    lse, mx, arg = lse.reshape(b), mx.reshape(b), arg.reshape(b)
    arg = owner * b + arg
    row_arg = jnp.where(_wins(mx, arg, row_max, row_arg), arg, row_arg)
    row_max = jnp.maximum(row_max, mx)
    row_lse = jnp.logaddexp(row_lse, lse)
    visiting = ring_shift((y_blk, col_lse, col_max, col_arg), axis_name)
    return (row_lse, row_max, row_arg, visiting), None

  zeros = jnp.zeros_like(xs[:, 0], dtype=jnp.int32)
  init = (neg_inf, neg_inf, zeros, (y, neg_inf, neg_inf, zeros))
  (row_lse, _, row_arg, (_, col_lse, _, col_arg)), _ = jax.lax.scan(
      ring_step, init, jnp.arange(size))
  return row_lse, col_lse, row_arg, col_arg


def pair_metrics(xs, y, pos, best_text, best_image, axis_name, logit_bias=0.0):
  """In-batch retrieval metrics of a ring loss, without another pass over the blocks.

  Args:
    xs: ``[b, D]`` scaled normalised images; y: ``[b, D]`` normalised texts (local shards).
    pos: ``[b]`` logits of the local positive pairs.
    best_text, best_image: int ``[b]`` global argmax indices from :func:`lse_argmax_stats`.
    axis_name: mapped data axis, or None.
    logit_bias: scalar added to every logit (SigLIP), counted in the negative mean.

  Returns:
    ``i2t_acc``, ``t2i_acc``, ``pos_logit``, ``neg_logit`` (stop-gradient). The sum of all
    logits is ``(Σ xs) · (Σ y) + B² · bias``, so the negative mean needs no extra ring.
  """
  b = xs.shape[0]
  global_b = b * axis_size(axis_name)
  total = (lambda v: v) if axis_name is None else (lambda v: jax.lax.psum(v, axis_name))
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  own = offset + jnp.arange(b)
  pos_sum = total(jnp.sum(pos))
  all_sum = (jnp.dot(total(jnp.sum(xs, axis=0)), total(jnp.sum(y, axis=0)))
             + float(global_b) * global_b * logit_bias)
  num_neg = float(global_b) * (global_b - 1)  # float: B² overflows int32
  metrics = {
      "i2t_acc": total(jnp.sum(best_text == own)) / global_b,
      "t2i_acc": total(jnp.sum(best_image == own)) / global_b,
      "pos_logit": pos_sum / global_b,
      "neg_logit": (all_sum - pos_sum) / num_neg if num_neg else 0.0,
  }
  return jax.tree.map(jax.lax.stop_gradient, metrics)

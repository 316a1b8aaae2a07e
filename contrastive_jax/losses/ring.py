"""Ring machinery shared by the memory-lean losses (jax only).

Shards of one modality travel around the devices of the mapped axis with
``jax.lax.ppermute``; each device scores its local rows against the visiting shard in row
blocks, so no device ever holds the global similarity matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


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


# ---- Scaled form: Z_ij = (x_i · y_j) · a_i · b_j on the raw embeddings ------------------------
#
# The normalised, scaled embeddings ``s · x̂`` and ``ŷ`` are ``[b, D]`` copies of the inputs;
# at large batches on one device they dominate a ring loss's memory. The functions below score
# the raw rows instead and apply per-row factors (``a_i = s / ||x_i||``, ``b_j = 1 / ||y_j||``)
# to each ``[c, b]`` block, so the only ``[b, D]`` arrays are the inputs, the float32 gradients
# and (on several devices) the visiting shard with its incoming copy.


def float_rows(image_emb, text_emb):
  """Both ``[b, D]`` inputs in one float dtype: theirs when they share a float dtype
  (bfloat16 stays bfloat16), float32 otherwise (a mixed pair is promoted)."""
  x, y = jnp.asarray(image_emb), jnp.asarray(text_emb)
  dtype = jnp.result_type(x, y)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return x.astype(dtype), y.astype(dtype)


def inverse_norm(x):
  """float32 ``[b]`` factors ``1 / (||x_i|| + eps)`` of ``[b, D]`` rows: ``x_i`` times its
  factor is :func:`common.l2_normalize`'s row (same floor, so a zero row gets a finite factor
  and no gradient through its norm). One fused reduction; no ``[b, D]`` copy."""
  squared = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1)
  norm = jnp.sqrt(jnp.maximum(squared, jnp.finfo(jnp.float32).tiny))
  return 1.0 / (norm + common.NORM_EPS)


def row_dot(x, y):
  """float32 ``[b]`` row-wise dot products of ``[b, D]`` arrays (``y`` may be one ``[D]``
  row, broadcast); one fused reduction."""
  return jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)


def scaled_row_sum(x, scale, axis_name):
  """float32 ``[D]`` global ``Σ_i scale_i x_i`` over the whole batch (summed over devices; a
  fused reduction, no ``[b, D]`` copy)."""
  return common.global_sum(jnp.sum(scale[:, None] * x.astype(jnp.float32), axis=0), axis_name)


def dot_t(x, y):
  """``x @ yᵀ`` with float32 accumulation: ``[c, D] x [b, D] -> [c, b]`` float32 (bfloat16
  products are exact in float32, so bfloat16 rows need no float32 copy where the backend
  multiplies them natively)."""
  if x.dtype != y.dtype:
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  return jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_rows(v, y):
  """``v @ y``: float32 ``[c, b]`` weights times ``[b, D]`` rows -> float32 ``[c, D]``.

  A bfloat16 ``y`` is multiplied as stored, with ``v`` split into two bfloat16 terms
  (``v ≈ hi + lo`` to about 2⁻¹⁶ relative, bfloat16 having float32's exponent range) and
  float32 accumulation: no float32 copy of the ``[b, D]`` shard, at float32-like accuracy.
  """
  if y.dtype == jnp.bfloat16:
    hi = v.astype(jnp.bfloat16)
    lo = (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    dot = lambda w: jax.lax.dot(w, y, preferred_element_type=jnp.float32)
    return dot(hi) + dot(lo)
  return jnp.dot(v, y.astype(jnp.float32), preferred_element_type=jnp.float32)


def ring_fold(step, state, visiting, axis_name):
  """``state = step(state, visiting, k)`` for the ``W`` shards ``k = 0 … W−1`` of the ring.

  ``visiting`` (a pytree, the local shard at ``k = 0``) is updated by ``step`` — ``step``
  returns ``(state, visiting)`` — and shifted to the next device between steps: ``W − 1``
  shifts, none after the last step. The first and last steps are peeled off the loop, so the
  local shard is read in place (a loop carry initialised with it would be a copy) and one
  device needs no loop at all.

  Returns:
    ``(state, visiting)`` after the last step; ``visiting`` is then the shard that arrived
    last, i.e. that of the next device on the ring (one more :func:`ring_shift` takes it home).
  """
  size = axis_size(axis_name)
  state, visiting = step(state, visiting, 0)
  if size == 1:
    return state, visiting
  visiting = ring_shift(visiting, axis_name)
  if size > 2:
    def body(carry, k):
      state, visiting = step(*carry, k)
      return (state, ring_shift(visiting, axis_name)), None

    (state, visiting), _ = jax.lax.scan(body, (state, visiting), jnp.arange(1, size - 1))
  return step(state, visiting, size - 1)


def scaled_lse_argmax_stats(x, y, row_scale, col_scale, axis_name, block_size):
  """Ring pass: running LSE/argmax statistics of ``Z_ij = (x_i · y_j) · row_scale_i ·
  col_scale_j`` over the global batch.

  Args:
    x, y: ``[b, D]`` raw rows (local shards; any float dtype, products summed in float32).
    row_scale, col_scale: float32 ``[b]`` factors of the rows of ``x`` / ``y``.
    axis_name: mapped data axis, or None.
    block_size: local rows of ``x`` scored at once (one block when it does not divide ``b``).

  Returns:
    ``(lse_i2t [b], lse_t2i [b], best_text [b], best_image [b])``; ``best_*`` are the global
    indices of each local row's / local column's highest logit (ties: the lowest index).
  """
  b = x.shape[0]
  size = axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks = row_blocks(x, block_size)
  n, c = x_blocks.shape[:2]
  a_blocks = row_scale.reshape(n, c)

  def step(rows, visiting, k):
    row_lse, row_max, row_arg = rows
    (y_blk, b_blk), cols = visiting

    def block_step(cols, inputs):
      col_lse, col_max, col_arg = cols
      x_blk, a_blk, first_row = inputs
      z = dot_t(x_blk, y_blk) * a_blk[:, None] * b_blk[None, :]  # [c, b]
      col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(z, axis=0))
      blk_max = jnp.max(z, axis=0)
      blk_arg = me * b + first_row + jnp.argmax(z, axis=0)
      col_arg = jnp.where(_wins(blk_max, blk_arg, col_max, col_arg), blk_arg, col_arg)
      col_max = jnp.maximum(col_max, blk_max)
      return (col_lse, col_max, col_arg), (jax.nn.logsumexp(z, axis=1), jnp.max(z, axis=1),
                                           jnp.argmax(z, axis=1))

    cols, (lse, mx, arg) = jax.lax.scan(block_step, cols, (x_blocks, a_blocks, jnp.arange(n) * c))
    lse, mx, arg = lse.reshape(b), mx.reshape(b), arg.reshape(b)
    arg = (me - k) % size * b + arg  # the visiting texts' owner is k devices back
    row_arg = jnp.where(_wins(mx, arg, row_max, row_arg), arg, row_arg)
    return (jnp.logaddexp(row_lse, lse), jnp.maximum(row_max, mx), row_arg), ((y_blk, b_blk), cols)

  # full_like keeps the inputs' device-varying type, as scan carries inside shard_map need.
  neg_inf = jnp.full_like(row_scale, -jnp.inf)
  zeros = jnp.zeros_like(row_scale, dtype=jnp.int32)
  (row_lse, _, row_arg), (_, cols) = ring_fold(
      step, (neg_inf, neg_inf, zeros), ((y, col_scale), (neg_inf, neg_inf, zeros)), axis_name)
  col_lse, _, col_arg = ring_shift(cols, axis_name)  # the texts' statistics go home
  return row_lse, col_lse, row_arg, col_arg


def scaled_rows_grad(x, row_scale, row_args, y, col_scale, col_args, dz_fn, axis_name,
                     block_size, zero=0.0):
  """Gradient w.r.t. the local rows of ``x`` of a loss of ``Z_ij = (x_i · y_j) · a_i · b_j``.

  One pass of a ring backward: the columns ``y`` (with their factors ``b`` and ``col_args``)
  travel the ring; each local row block gets its complete gradient in place, so nothing
  travels home. Call it once more with the roles swapped for ``y``'s gradient.

  Args:
    x, y: ``[b, D]`` raw rows and columns (local shards, any float dtype).
    row_scale, col_scale: float32 ``[b]`` factors ``a`` and ``b``.
    row_args, col_args: pytrees of ``[b]`` per-row / per-column arrays for ``dz_fn``.
    dz_fn: ``dz_fn(z [c, b], row_args blocks [c], col_args [b]) -> ∂L/∂Z [c, b]`` float32.
    axis_name: mapped data axis, or None.
    block_size: local rows scored at once (one block when it does not divide ``b``).
    zero: ``0.0`` or ``-0.0``, the accumulator's initial value (both exact identities of
      the sums). Give two passes of one backward different ones: XLA would otherwise merge
      the two equal initial ``[b, D]`` constants into one buffer and copy it, which keeps a
      ``[b, D]`` temporary that the gradient's output buffer could not replace.

  Returns:
    float32 ``(gx [b, D], g_row_scale [b], dz_row_sum [b])``: ``gx_i = a_i Σ_j ∂Z_ij b_j y_j``
    (the factors held fixed), ``∂L/∂a_i = Σ_j ∂Z_ij b_j (x_i · y_j)`` and ``Σ_j ∂Z_ij``.
  """
  x_blocks = row_blocks(x, block_size)
  n, c = x_blocks.shape[:2]
  blocked = lambda v: v.reshape(n, c)
  a_blocks, arg_blocks = blocked(row_scale), jax.tree.map(blocked, row_args)

  def step(state, visiting, _):
    gx, g_a, dz_sum = state
    y_blk, b_blk, cols = visiting

    def block_step(gx, inputs):
      first_row, x_blk, a_blk, rows = inputs
      raw = dot_t(x_blk, y_blk)  # [c, b]
      dz = dz_fn(raw * a_blk[:, None] * b_blk[None, :], rows, cols)
      v = dz * b_blk[None, :]
      # In place into the [b, D] accumulator, which has the result's shape so that the
      # elementwise epilogue outside can write the gradient into its buffer.
      old = jax.lax.dynamic_slice_in_dim(gx, first_row, c)
      gx = jax.lax.dynamic_update_slice_in_dim(
          gx, old + a_blk[:, None] * dot_rows(v, y_blk), first_row, 0)
      return gx, (jnp.sum(v * raw, axis=1), jnp.sum(dz, axis=1))

    gx, (ga_new, dz_new) = jax.lax.scan(
        block_step, gx, (jnp.arange(n) * c, x_blocks, a_blocks, arg_blocks))
    return (gx, g_a + ga_new.reshape(-1), dz_sum + dz_new.reshape(-1)), visiting

  zeros = jnp.zeros_like(row_scale)
  init = (jnp.full_like(x, zero, dtype=jnp.float32), zeros, zeros)
  (gx, g_a, dz_sum), _ = ring_fold(step, init, (y, col_scale, col_args), axis_name)
  return gx, g_a, dz_sum


def pair_metrics_from_sums(pos, sum_x, sum_y, best_text, best_image, axis_name,
                           logit_bias=0.0):
  """In-batch retrieval metrics of a ring loss, without another pass over the blocks.

  Args:
    pos: ``[b]`` logits of the local positive pairs.
    sum_x, sum_y: ``[D]`` global sums ``Σ_i xs_i`` and ``Σ_j y_j`` over the whole batch (so
      that ``Σ_ij Z_ij = sum_x · sum_y``), already summed over devices.
    best_text, best_image: int ``[b]`` global argmax indices from
      :func:`scaled_lse_argmax_stats`.
    axis_name: mapped data axis, or None.
    logit_bias: scalar added to every logit (SigLIP), counted in the negative mean.

  Returns:
    ``i2t_acc``, ``t2i_acc``, ``pos_logit``, ``neg_logit`` (stop-gradient). The sum of all
    logits is ``sum_x · sum_y + B² · bias``, so the negative mean needs no extra ring.
  """
  b = pos.shape[0]
  global_b = b * axis_size(axis_name)
  total = (lambda v: v) if axis_name is None else (lambda v: jax.lax.psum(v, axis_name))
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  own = offset + jnp.arange(b)
  pos_sum = total(jnp.sum(pos))
  all_sum = jnp.dot(sum_x, sum_y) + float(global_b) * global_b * logit_bias
  num_neg = float(global_b) * (global_b - 1)  # float: B² overflows int32
  metrics = {
      "i2t_acc": total(jnp.sum(best_text == own)) / global_b,
      "t2i_acc": total(jnp.sum(best_image == own)) / global_b,
      "pos_logit": pos_sum / global_b,
      "neg_logit": (all_sum - pos_sum) / num_neg if num_neg else 0.0,
  }
  return jax.tree.map(jax.lax.stop_gradient, metrics)

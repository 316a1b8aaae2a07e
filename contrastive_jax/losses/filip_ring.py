"""Memory-lean FILIP loss: a ``ppermute`` ring over devices, row blocks inside a device.

The global-view :func:`contrastive_jax.losses.filip.filip_loss` gathers every token tensor
and holds ``[b, B, T_img, T_txt]`` token similarities per direction on each device. Here the
text shards (tokens and mask) travel around the ring of devices instead, as in
:mod:`contrastive_jax.losses.clip_ring`. At each of the ``W`` ring steps a device scores its
local images, in row blocks of ``block_size``, against the visiting texts: one token
similarity block ``[c, b, T_img, T_txt]`` gives both

* ``A[i, j]`` (image→text score of local image ``i``, softmax over texts), and
* ``C[i, j]`` (text→image score of visiting text ``j`` against local image ``i``, softmax
  over images),

and only running statistics are kept: per local image the log-sum-exp of ``s·A`` over all
``B`` texts, per visiting text the log-sum-exp of ``s·C`` over all ``B`` images (it travels
with the text and is home after ``W`` steps), the first arg-max of each for the accuracies,
and row sums of ``s·A`` for the mean negative logit.

A ``jax.custom_vjp`` saves only the normalised tokens, masks, the scale and the LSE
statistics; the backward pass recomputes each block and applies ``jax.vjp`` of the block
logit function ``(x, y, s) -> (s·A, s·C)`` to ``g_row·softmax_rows(s·A)`` and
``g_col·softmax_cols(s·C)``, which gives the token gradients and the exact gradient of the
scale, while a second ring carries each text's gradient accumulator home. The scale
multiplies the scores (as in ``filip_loss``) rather than the tokens, so no scaled copy of
the image tokens is kept. The live tensor per device is ``block_size × b × T_img × T_txt``
floats instead of ``b × B × T_img × T_txt``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, filip, ring


def _block_scores(x, image_mask, y, text_mask):
  """Both late-interaction scores of an image block against a text shard, from one tensor.

  Args:
    x: ``[c, Ti, D]`` normalised (possibly scaled) image tokens, padded ones zeroed.
    image_mask: bool ``[c, Ti]``.
    y: ``[n, Tt, D]`` normalised text tokens, padded ones zeroed.
    text_mask: bool ``[n, Tt]``.

  Returns:
    ``(a, cc)``, float32 ``[c, n]`` each: ``a[i, j]`` = mean over valid tokens of image ``i``
    of the max over valid tokens of text ``j``; ``cc[i, j]`` = mean over valid tokens of
    text ``j`` of the max over valid tokens of image ``i``. Same operations (hence values
    and sub-gradients) as :func:`contrastive_jax.losses.filip.late_interaction_scores`.
  """
  sim = jnp.einsum("cqd,nkd->cnqk", x, y)
  masked = filip.MASKED_SIMILARITY
  # Image -> text: every image token picks its best text token.
  best_a = jnp.max(jnp.where(text_mask[None, :, None, :], sim, masked), axis=-1)  # [c, n, Ti]
  best_a = jnp.where(jnp.any(text_mask, axis=-1)[None, :, None], best_a, 0.0)
  best_a = jnp.where(image_mask[:, None, :], best_a, 0.0)
  count_img = jnp.maximum(jnp.sum(image_mask, axis=-1), 1).astype(jnp.float32)
  a = jnp.sum(best_a, axis=-1) / count_img[:, None]
  # Text -> image: every text token picks its best image token.
  best_c = jnp.max(jnp.where(image_mask[:, None, :, None], sim, masked), axis=-2)  # [c, n, Tt]
  best_c = jnp.where(jnp.any(image_mask, axis=-1)[:, None, None], best_c, 0.0)
  best_c = jnp.where(text_mask[None, :, :], best_c, 0.0)
  count_txt = jnp.maximum(jnp.sum(text_mask, axis=-1), 1).astype(jnp.float32)
  cc = jnp.sum(best_c, axis=-1) / count_txt[None, :]
  return a, cc


def _scaled_block_scores(x, image_mask, y, text_mask, scale):
  """``(s·A, s·C)`` of a block: the logits, scaled after the scores as ``filip_loss`` does."""
  a, cc = _block_scores(x, image_mask, y, text_mask)
  return scale * a, scale * cc


def _pair_scores(x, image_mask, y, text_mask):
  """``(A_ii, C_ii)`` of the local positive pairs, ``[b]`` each."""
  one = lambda v: v[None]
  a, cc = jax.vmap(lambda *t: _block_scores(*map(one, t)))(x, image_mask, y, text_mask)
  return a[:, 0, 0], cc[:, 0, 0]


def _blocks(x, block_size):
  """``[b, ...] -> [b / c, c, ...]`` (one block when ``c`` is None or does not divide ``b``)."""
  b = x.shape[0]
  c = block_size if block_size and b % block_size == 0 else b
  return x.reshape(b // c, c, *x.shape[1:])


def _running_max(best, arg, value, index):
  """Keeps the larger value; on a tie the smaller global index (``jnp.argmax``'s choice)."""
  better = (value > best) | ((value == best) & (index < arg))
  return jnp.where(better, value, best), jnp.where(better, index, arg)


def _ring_stats(x, image_mask, y, text_mask, scale, axis_name, block_size):
  """Ring pass over the text shards; see :func:`_filip_stats` for the outputs."""
  b = x.shape[0]
  size = ring.axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks, m_blocks = _blocks(x, block_size), _blocks(image_mask, block_size)
  c = x_blocks.shape[1]
  first_rows = jnp.arange(x_blocks.shape[0]) * c
  # *_like keeps the inputs' device-varying type, as scan carries inside shard_map need.
  neg_inf = jnp.full_like(x[:, 0, 0], -jnp.inf)
  big = jnp.full_like(x[:, 0, 0], b * size, dtype=jnp.int32)

  def ring_step(carry, k):
    row_lse, row_max, row_arg, row_sum, visiting = carry
    y_v, tm_v, col_lse, col_max, col_arg = visiting
    owner = (me - k) % size  # whose texts are visiting

    def block_step(col_carry, inputs):
      col_lse, col_max, col_arg = col_carry
      x_blk, m_blk, first_row = inputs
      a, cc = _scaled_block_scores(x_blk, m_blk, y_v, tm_v, scale)  # [c, b] each
      col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(cc, axis=0))
      col_max, col_arg = _running_max(col_max, col_arg, jnp.max(cc, axis=0),
                                      me * b + first_row + jnp.argmax(cc, axis=0))
      return (col_lse, col_max, col_arg), (jax.nn.logsumexp(a, axis=1), jnp.max(a, axis=1),
                                           jnp.argmax(a, axis=1), jnp.sum(a, axis=1))

    (col_lse, col_max, col_arg), (lse, mx, arg, tot) = jax.lax.scan(
        block_step, (col_lse, col_max, col_arg), (x_blocks, m_blocks, first_rows))
    row_max, row_arg = _running_max(row_max, row_arg, mx.reshape(b), owner * b + arg.reshape(b))
    row_lse = jnp.logaddexp(row_lse, lse.reshape(b))
    row_sum = row_sum + tot.reshape(b)
    visiting = ring.ring_shift((y_v, tm_v, col_lse, col_max, col_arg), axis_name)
    return (row_lse, row_max, row_arg, row_sum, visiting), None

  init = (neg_inf, neg_inf, big, jnp.zeros_like(neg_inf),
          (y, text_mask, neg_inf, neg_inf, big))
  (row_lse, _, row_arg, row_sum, (_, _, col_lse, _, col_arg)), _ = jax.lax.scan(
      ring_step, init, jnp.arange(size))
  return row_lse, col_lse, row_arg, col_arg, row_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _filip_stats(x, image_mask, y, text_mask, scale, axis_name, block_size):
  """Global-batch statistics of the logits ``s·A``, ``s·C``.

  Args:
    x, y: normalised local image / text tokens (padded ones zeroed); masks as in
      :func:`_block_scores`; scale: the logit scale as a device-varying float32 scalar.

  Returns:
    ``(lse_i2t [b], lse_t2i [b], best_text [b], best_image [b], sum_i2t [b])``: per local
    image the LSE over all texts of ``s·A`` and the row sum of ``s·A``; per local text the
    LSE over all images of ``s·C``; ``best_*`` the global index of the first arg-max. Only
    the two LSE outputs carry a gradient (the others feed stop-gradient metrics).
  """
  return _ring_stats(x, image_mask, y, text_mask, scale, axis_name, block_size)


def _filip_stats_fwd(x, image_mask, y, text_mask, scale, axis_name, block_size):
  stats = _ring_stats(x, image_mask, y, text_mask, scale, axis_name, block_size)
  return stats, (x, image_mask, y, text_mask, scale, stats[0], stats[1])


def _filip_stats_bwd(axis_name, block_size, residuals, cotangents):
  """Recomputes each block and pulls ``(g_row·softmax_rows, g_col·softmax_cols)`` back
  through it (to the tokens and the scale); a second ring carries each text's statistics,
  cotangent and gradient accumulator home."""
  x, image_mask, y, text_mask, scale, row_lse, col_lse = residuals
  g_row, g_col = cotangents[:2]
  x_blocks, m_blocks = _blocks(x, block_size), _blocks(image_mask, block_size)
  row_lse_blocks, g_row_blocks = _blocks(row_lse, block_size), _blocks(g_row, block_size)
  block_ids = jnp.arange(x_blocks.shape[0])

  def ring_step(carry, _):
    gx_blocks, gs, (y_v, tm_v, col_lse_v, g_col_v, gy_v) = carry

    def block_step(acc, inputs):
      gx_blocks, gy_v, gs = acc
      i, x_blk, m_blk, lse_blk, g_blk = inputs
      (a, cc), pullback = jax.vjp(
          lambda x, y, s: _scaled_block_scores(x, m_blk, y, tm_v, s), x_blk, y_v, scale)
      da = g_blk[:, None] * jnp.exp(a - lse_blk[:, None])
      dc = g_col_v[None, :] * jnp.exp(cc - col_lse_v[None, :])
      gx_blk, gy_blk, gs_blk = pullback((da, dc))
      # Accumulated in place: no second image-sized buffer per ring step.
      return (gx_blocks.at[i].add(gx_blk), gy_v + gy_blk, gs + gs_blk), None

    (gx_blocks, gy_v, gs), _ = jax.lax.scan(
        block_step, (gx_blocks, gy_v, gs),
        (block_ids, x_blocks, m_blocks, row_lse_blocks, g_row_blocks))
    visiting = ring.ring_shift((y_v, tm_v, col_lse_v, g_col_v, gy_v), axis_name)
    return (gx_blocks, gs, visiting), None

  init = (jnp.zeros_like(x_blocks), jnp.zeros_like(scale),
          (y, text_mask, col_lse, g_col, jnp.zeros_like(y)))
  (gx_blocks, gs, (_, _, _, _, gy)), _ = jax.lax.scan(ring_step, init, None,
                                                      length=ring.axis_size(axis_name))
  return gx_blocks.reshape(x.shape), None, gy, None, gs


_filip_stats.defvjp(_filip_stats_fwd, _filip_stats_bwd)


def ring_filip_loss(image_tokens, text_tokens, text_mask, logit_scale, *, image_mask=None,
                    keep_image_tokens=None, rng=None, block_size=None, axis_name=None):
  """FILIP's symmetric InfoNCE over the global batch without the global token similarities.

  Same contract, value, gradients and metrics as
  :func:`contrastive_jax.losses.filip.filip_loss`.

  Args:
    image_tokens: ``[b, T_img, D]`` image tokens (local shard when ``axis_name`` is given),
      any float dtype.
    text_tokens: ``[b, T_txt, D]`` text tokens paired row by row with ``image_tokens``.
    text_mask: bool ``[b, T_txt]``, True for valid tokens.
    logit_scale: scalar ``s = exp(θ)``.
    image_mask: bool ``[b, T_img]``, or None when every image token is valid.
    keep_image_tokens: optional fraction in ``(0, 1]`` of every image's tokens kept before
      the ring, drawn by :func:`contrastive_jax.losses.filip.sample_image_tokens`.
    rng: PRNG key for the token reduction, the same on every device.
    block_size: local images scored at once (should divide ``b``; None or a non-divisor:
      all ``b``). The live similarity tensor per device is
      ``block_size × b × T_img' × T_txt`` floats.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, and
    ``i2t_acc``, ``t2i_acc``, ``pos_logit``, ``neg_logit`` (stop-gradient).
  """
  if image_mask is None:
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
  image_mask = jnp.asarray(image_mask, bool)
  text_mask = jnp.asarray(text_mask, bool)
  image_tokens, image_mask = filip.reduce_image_tokens(
      image_tokens, image_mask, keep_image_tokens, rng, axis_name=axis_name)

  x = filip.prepare_tokens(image_tokens, image_mask)
  y = filip.prepare_tokens(text_tokens, text_mask)
  # A device-varying copy of the scale (its gradient is summed back over devices by JAX).
  scale = jnp.asarray(logit_scale, jnp.float32) + jnp.zeros_like(x[0, 0, 0])
  b = x.shape[0]
  global_b = b * ring.axis_size(axis_name)
  row_lse, col_lse, best_text, best_image, row_sum = _filip_stats(
      x, image_mask, y, text_mask, scale, axis_name, block_size)
  pos_a, pos_c = _pair_scores(x, image_mask, y, text_mask)
  pos_a, pos_c = scale * pos_a, scale * pos_c
  loss = common.global_sum(jnp.sum(row_lse - pos_a) + jnp.sum(col_lse - pos_c), axis_name)
  loss = 0.5 * loss / global_b

  def mean(local_sum, count):
    return common.global_sum(local_sum, axis_name) / count

  own = common.shard_offset(b, axis_name) + jnp.arange(b)
  num_neg = float(global_b) * (global_b - 1)  # float: B² overflows int32
  metrics = {
      "i2t_acc": mean(jnp.sum(best_text == own), global_b),
      "t2i_acc": mean(jnp.sum(best_image == own), global_b),
      "pos_logit": mean(jnp.sum(pos_a), global_b),
      "neg_logit": mean(jnp.sum(row_sum) - jnp.sum(pos_a), num_neg) if num_neg else 0.0,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

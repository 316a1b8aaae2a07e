"""Memory-lean NT-Xent (SimCLR, METHODS.md §1.7) and DCL / DCLW (§1.8): a ``ppermute`` ring.

The global-view :func:`~contrastive_jax.losses.simclr.nt_xent_loss` and
:func:`~contrastive_jax.losses.dcl.dcl_loss` gather both views and hold ``[2b, 2B]`` logits
per device. Here each device's ``2b`` normalised embeddings ``a = [ĥ¹; ĥ²]`` (its candidate
columns) travel around the ring of devices instead; at each of the ``W`` ring steps a device
scores its ``2b`` local anchors against the visiting shard in row blocks of ``block_size``
and keeps per anchor only running statistics: the log-sum-exp over the allowed columns (all
but the anchor's own global column; for DCL also its positive's), and the largest negative
logit with its lowest global column (for the metrics). Both masked columns live on the
anchor's own device, so masking needs only the ring step and the local row/column indices.

A ``jax.custom_vjp`` saves only the embeddings and the log-sum-exps and recomputes each block
in the backward pass, ``dZ = g_row · softmax_rows(Z)``; a second ring carries each visiting
shard's column gradient home. Peak memory per device is ``O(block_size · 2b + b · D)``.
Values, gradients and metrics equal the global-view losses (tested on 1, 2 and 8 devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, dcl, ring, simclr

_MASKED = simclr._MASKED  # pylint: disable=protected-access


def _block_masks(first_row, c, two_b, home, exclude_positive):
  """bool ``[c, 2b]`` masks of one row block against a visiting shard: ``(self, positive,
  excluded)``. Rows are local anchors ``first_row + [0, c)``; columns the visiting shard's
  ``[ĥ¹; ĥ²]`` rows; both masks are empty unless the shard is the anchors' own (``home``)."""
  rows = (first_row + jnp.arange(c))[:, None]
  cols = jnp.arange(two_b)[None, :]
  own = home & (cols == rows)
  pos = home & (cols == (rows + two_b // 2) % two_b)
  return own, pos, (own | pos) if exclude_positive else own


def _ring_stats(xs, y, axis_name, block_size, exclude_positive):
  """Ring pass over the global columns; see :func:`_anchor_stats` for the outputs."""
  two_b = xs.shape[0]
  b = two_b // 2
  size = ring.axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks = ring.row_blocks(xs, block_size)
  n_blocks, c, _ = x_blocks.shape
  first_rows = jnp.arange(n_blocks) * c
  local_cols = jnp.arange(two_b)

  def merge(acc, k, y_v):
    owner = (me - k) % size  # whose embeddings are visiting
    # Global column of the visiting rows: view 1 at owner·b + j, view 2 at B + owner·b + j.
    global_cols = jnp.where(local_cols < b, owner * b + local_cols,
                            size * b + owner * b + local_cols - b)

    def block_step(_, inputs):
      x_blk, first_row = inputs
      z = x_blk @ y_v.T  # [c, 2b]: the only logits ever held
      own, pos, excluded = _block_masks(first_row, c, two_b, owner == me, exclude_positive)
      neg = jnp.where(own | pos, -jnp.inf, z)
      return None, (jax.nn.logsumexp(jnp.where(excluded, _MASKED, z), axis=1),
                    jnp.max(neg, axis=1), global_cols[jnp.argmax(neg, axis=1)],
                    jnp.sum(jnp.where(pos, z, 0.0), axis=1))

    _, stats = jax.lax.scan(block_step, None, (x_blocks, first_rows))
    blk_lse, blk_max, blk_arg, blk_pos = (s.reshape(two_b) for s in stats)
    lse, best, arg, pos_z = acc
    # Ties go to the lower global column, as a dense argmax does, whatever the ring order.
    wins = (blk_max > best) | ((blk_max == best) & (blk_arg < arg))
    return (jnp.logaddexp(lse, blk_lse), jnp.maximum(best, blk_max),
            jnp.where(wins, blk_arg, arg), pos_z + blk_pos)

  def ring_step(carry, k):
    acc, y_v = carry
    return (merge(acc, k, y_v), ring.ring_shift(y_v, axis_name)), None

  # full_like keeps the inputs' device-varying type, as scan carries inside shard_map need.
  neg_inf = jnp.full_like(xs[:, 0], -jnp.inf)
  acc = (neg_inf, neg_inf, jnp.full_like(xs[:, 0], 2 * size * b, dtype=jnp.int32),
         jnp.zeros_like(xs[:, 0]))
  (acc, y_v), _ = jax.lax.scan(ring_step, (acc, y), jnp.arange(size - 1))
  return merge(acc, size - 1, y_v)  # the last shard needs no further shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _anchor_stats(xs, y, axis_name, block_size, exclude_positive):
  """Per local anchor of ``Z = xs @ [all y]ᵀ`` (rows ``[2b]``, float32 unless noted):

  ``lse`` over the allowed columns (gradient by a custom rule), and without gradient: the
  largest negative logit, its lowest global column (int32) and the positive's logit.
  """
  return _ring_stats(xs, y, axis_name, block_size, exclude_positive)


def _anchor_stats_fwd(xs, y, axis_name, block_size, exclude_positive):
  stats = _ring_stats(xs, y, axis_name, block_size, exclude_positive)
  return stats, (xs, y, stats[0])


def _anchor_stats_bwd(axis_name, block_size, exclude_positive, residuals, cotangents):
  """Recomputes each block, ``dZ = g · softmax_rows(Z)`` (zero at the excluded columns); a
  second ring carries the visiting shard and its gradient accumulator home after ``W`` shifts.
  Only ``lse`` has a gradient (the other outputs are used under stop-gradient)."""
  xs, y, lse = residuals
  g = cotangents[0]
  two_b = xs.shape[0]
  size = ring.axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks = ring.row_blocks(xs, block_size)
  n_blocks, c, _ = x_blocks.shape
  first_rows = jnp.arange(n_blocks) * c
  lse_blocks, g_blocks = lse.reshape(n_blocks, c), g.reshape(n_blocks, c)

  def ring_step(carry, k):
    gx_blocks, (y_v, gy_v) = carry
    home = (me - k) % size == me

    def block_step(gy_v, inputs):
      x_blk, first_row, lse_blk, g_blk = inputs
      excluded = _block_masks(first_row, c, two_b, home, exclude_positive)[2]
      dz = jnp.where(excluded, 0.0,
                     g_blk[:, None] * jnp.exp(x_blk @ y_v.T - lse_blk[:, None]))
      return gy_v + dz.T @ x_blk, dz @ y_v

    gy_v, gx_new = jax.lax.scan(block_step, gy_v, (x_blocks, first_rows, lse_blocks, g_blocks))
    return (gx_blocks + gx_new, ring.ring_shift((y_v, gy_v), axis_name)), None

  init = (jnp.zeros_like(x_blocks), (y, jnp.zeros_like(y)))
  (gx_blocks, (_, gy)), _ = jax.lax.scan(ring_step, init, jnp.arange(size))
  return gx_blocks.reshape(xs.shape), gy


_anchor_stats.defvjp(_anchor_stats_fwd, _anchor_stats_bwd)


def _ring_terms(z1, z2, temperature, block_size, axis_name, exclude_positive):
  """Shared set-up: ``(a, xs, pos, lse, neg_max, neg_arg, pos_z)`` for the ``2b`` local anchors.

  ``a [2b, D]`` normalised ``[ĥ¹; ĥ²]``, ``xs = a / τ``, ``pos [2b]`` the differentiable positive
  logits (closed form, local), the rest from :func:`_anchor_stats` (the last three
  stop-gradient).
  """
  a = jnp.concatenate([common.l2_normalize(z1), common.l2_normalize(z2)], axis=0)
  xs = a / temperature
  b = z1.shape[0]
  pos = jnp.sum(xs * jnp.roll(a, b, axis=0), axis=1)  # anchor i's positive is row (i + b) % 2b
  lse, neg_max, neg_arg, pos_z = _anchor_stats(xs, a, axis_name, block_size, exclude_positive)
  stop = jax.lax.stop_gradient
  return a, xs, pos, lse, stop(neg_max), neg_arg, stop(pos_z)


def _logit_metrics(a, xs, pos_z, hit, axis_name):
  """``acc``, ``pos_logit`` and ``neg_logit`` over the global batch, with no further ring: the
  sum of all ``(2B)²`` logits is ``(Σ xs) · (Σ a)``; the negatives' sum drops the self and
  positive logits."""
  two_b = a.shape[0] * ring.axis_size(axis_name)
  total = lambda v: common.global_sum(v, axis_name)
  all_sum = jnp.dot(total(jnp.sum(xs, axis=0)), total(jnp.sum(a, axis=0)))
  pos_sum = total(jnp.sum(pos_z))
  neg_sum = all_sum - total(jnp.sum(xs * a)) - pos_sum
  num_neg = float(two_b) * (two_b - 2)  # float: B² overflows int32
  metrics = {
      "acc": total(jnp.sum(hit.astype(jnp.float32))) / two_b,
      "pos_logit": pos_sum / two_b,
      "neg_logit": neg_sum / num_neg if num_neg else 0.0,
  }
  return jax.tree.map(jax.lax.stop_gradient, metrics)


def ring_nt_xent_loss(z1, z2, temperature=0.1, *, block_size=None, axis_name=None):
  """NT-Xent over the global batch without materialising the ``[2b, 2B]`` logits.

  Same contract, value, gradients and metrics as
  :func:`contrastive_jax.losses.simclr.nt_xent_loss`.

  Args:
    z1: ``[b, D]`` projection-head outputs of the first view, any float dtype; the local shard
      when ``axis_name`` is given. Normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` (SimCLR/SLIP: 0.1).
    block_size: local anchor rows (of ``2b``) scored at once; should divide ``b`` (None, or
      one not dividing ``2b``: all ``2b``). Peak logits memory is ``block_size × 2b`` floats.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: float32 global-batch loss, identical on every device; ``acc``,
    ``pos_logit``, ``neg_logit`` as ``nt_xent_loss``.
  """
  a, xs, pos, lse, neg_max, neg_arg, pos_z = _ring_terms(
      z1, z2, temperature, block_size, axis_name, exclude_positive=False)
  b = z1.shape[0]
  global_b = b * ring.axis_size(axis_name)
  two_b = 2 * global_b
  loss = common.global_sum(jnp.sum(lse - pos), axis_name) / two_b

  # A dense argmax hits the positive iff it beats every negative, or ties the best ones at a
  # lower global column.
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  pos_col = jnp.concatenate([rows + global_b, rows])
  hit = (pos_z > neg_max) | ((pos_z == neg_max) & (pos_col < neg_arg))
  return loss, _logit_metrics(a, xs, pos_z, hit, axis_name)


def ring_dcl_loss(z1, z2, temperature=0.1, *, sigma=None, stop_gradient_weights=True,
                  block_size=None, axis_name=None):
  """Decoupled contrastive loss (DCL / DCLW) over the global batch, ring form.

  Same contract, value, gradients and metrics as :func:`contrastive_jax.losses.dcl.dcl_loss`.

  Args:
    z1: ``[b, D]`` projection-head outputs of the first view, any float dtype; the local shard
      when ``axis_name`` is given. Normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` (paper: 0.1).
    sigma: None for DCL; ``σ`` of the DCLW von Mises-Fisher weights (paper: 0.5).
    stop_gradient_weights: DCLW weights as constants (spec) or differentiable.
    block_size: local anchor rows (of ``2b``) scored at once; should divide ``b`` (None: all).
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: float32 global-batch loss (needs ``B ≥ 2``); ``acc``, ``pos_logit``,
    ``neg_logit`` and, for DCLW, ``weight_min`` / ``weight_max``, as ``dcl_loss``.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  a, xs, pos, lse, neg_max, _, pos_z = _ring_terms(
      z1, z2, temperature, block_size, axis_name, exclude_positive=True)
  b = z1.shape[0]
  two_b = 2 * b * ring.axis_size(axis_name)
  if sigma is None:
    weights = jnp.ones((b,), jnp.float32)
  else:
    weights = dcl.vmf_weights(pos[:b] * temperature, sigma, axis_name=axis_name)
    if stop_gradient_weights:
      weights = jax.lax.stop_gradient(weights)
  terms = lse - jnp.concatenate([weights, weights]) * pos
  loss = common.global_sum(jnp.sum(terms), axis_name) / two_b

  metrics = _logit_metrics(a, xs, pos_z, pos_z > neg_max, axis_name)
  if sigma is not None:
    w = jax.lax.stop_gradient(weights)
    w_min, w_max = jnp.min(w), jnp.max(w)
    if axis_name is not None:
      w_min, w_max = jax.lax.pmin(w_min, axis_name), jax.lax.pmax(w_max, axis_name)
    metrics["weight_min"], metrics["weight_max"] = w_min, w_max
  return loss, metrics

"""DreamLIP's losses (Zheng et al., ECCV 2024), METHODS.md §1.5.

Every image ``i`` comes with ``T`` texts: its raw caption (index 0) and ``T − 1`` sentences
sampled from its long caption. Three terms, all over the global batch (pattern L):

* the CLIP term on the raw captions, divided by ``T`` as the released code does
  (``ring_clip_loss``, memory-lean);
* a multi-positive image→text term: image ``i`` against all ``B·T`` texts, its own ``T``
  texts positive. :func:`multi_positive_loss` is the paper's InfoNCE form (§0.2 with the
  positives averaged, the SupCon "L_out" form); :func:`circle_multi_positive_loss` is the
  released code's Circle-loss form (γ = 32, m = 0.25, divided by 10);
* the sub-caption-specific grouping term (:func:`grouping_loss`): each text pools the
  patches of its own image with min-max normalised, thresholded similarity weights, and the
  ``B·T`` (pooled patches, text) pairs enter a symmetric InfoNCE with a second, local scale
  (``ring_clip_loss`` again, memory-lean).

Deviations from the released code (METHODS.md §3.3): the min-max normalisation is guarded
(all-equal similarities give uniform weights instead of 0/0 = NaN), and gathers keep their
gradient (exact global gradients, no ``1/W`` scaling).

Memory: :func:`ring_multi_positive_loss` (the default of :func:`dreamlip_loss`) passes the
``b·T`` local texts around a ``ppermute`` ring and scores them in row blocks under a
``jax.custom_vjp`` that keeps only embeddings and per-image log-sum-exps, so a device holds
``block_size × b·T`` logits at a time. The global-view :func:`multi_positive_loss` (``[b, B·T]``
logits per device) is its tested reference; the Circle form is global-view only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, ring
from contrastive_jax.losses.clip_ring import ring_clip_loss

# Stands in for a masked logit before a log-sum-exp: finite, so fully masked rows stay
# NaN-free (METHODS.md §0.2).
MASKED_LOGIT = -1e9
# Patch-similarity ranges (max − min, cosines) at or below this count as "all equal".
MINMAX_EPS = 1e-6


def _own_columns(b, t, axis_name):
  """bool ``[b, B·T]``: True where a gathered text belongs to the local row's image."""
  owner = jnp.arange(b * t * ring.axis_size(axis_name)) // t  # image of every text column
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  return owner[None, :] == rows[:, None]


def _texts_against_images(image_emb, text_emb, text_valid, axis_name):
  """Normalised local images vs all gathered texts.

  Returns:
    ``(sims [b, B·T] cosines, own [b, B·T] bool, valid [B·T] bool)``.
  """
  x = common.l2_normalize(image_emb)
  y = common.l2_normalize(text_emb)
  b, t, d = y.shape
  if text_valid is None:
    text_valid = jnp.ones((b, t), bool)
  text_valid = jnp.asarray(text_valid).astype(bool)
  y_all = common.all_gather_rows(y.reshape(b * t, d), axis_name)
  valid = common.all_gather_rows(text_valid.reshape(b * t).astype(jnp.float32), axis_name) > 0
  return x @ y_all.T, _own_columns(b, t, axis_name), valid


def _global_mean(local_sum, local_count, axis_name):
  count = common.global_sum(local_count, axis_name)
  return common.global_sum(local_sum, axis_name) / jnp.maximum(count, 1)


def _multi_positive_metrics(logits, own, valid, axis_name):
  """Top-1 hit rate (best valid text belongs to the image) and mean positive / negative logit."""
  masked = jnp.where(valid[None, :], logits, MASKED_LOGIT)
  best = jnp.argmax(masked, axis=1)
  hit = jnp.take_along_axis(own, best[:, None], axis=1)[:, 0].astype(jnp.float32)
  pos = own & valid[None, :]
  neg = ~own & valid[None, :]
  metrics = {
      "acc": _global_mean(jnp.sum(hit), hit.shape[0], axis_name),
      "pos_logit": _global_mean(jnp.sum(jnp.where(pos, logits, 0.0)), jnp.sum(pos), axis_name),
      "neg_logit": _global_mean(jnp.sum(jnp.where(neg, logits, 0.0)), jnp.sum(neg), axis_name),
  }
  return jax.tree.map(jax.lax.stop_gradient, metrics)


def multi_positive_loss(image_emb, text_emb, logit_scale, *, text_valid=None, axis_name=None):
  """Multi-positive image→text InfoNCE (the paper's form; METHODS.md §0.2, §1.5 (b)).

  ``ℓ_i = − (1/|P_i|) Σ_{p ∈ P_i} [Z_ip − LSE_{j ∈ V} Z_ij]`` with ``Z = s · x̂ ŷᵀ`` over all
  ``B·T`` texts, ``P_i`` the valid texts of image ``i`` and ``V`` all valid texts;
  ``L = mean_i ℓ_i`` over the images with at least one valid text. With ``T = 1`` this is
  CLIP's image→text direction.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is given).
    text_emb: ``[b, T, D]`` the ``T`` texts of every image.
    logit_scale: scalar ``s = exp(θ)``.
    text_valid: optional bool ``[b, T]``; False texts are neither positives nor negatives.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: float32 global-batch loss (the same on every device, exact global
    gradients) and ``acc`` (best text is one of the image's own), ``pos_logit``,
    ``neg_logit``.
  """
  sims, own, valid = _texts_against_images(image_emb, text_emb, text_valid, axis_name)
  logits = jnp.asarray(logit_scale, jnp.float32) * sims
  lse = jax.nn.logsumexp(jnp.where(valid[None, :], logits, MASKED_LOGIT), axis=1)  # [b]
  pos = own & valid[None, :]
  num_pos = jnp.sum(pos, axis=1)
  pos_sum = jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
  row = lse - pos_sum / jnp.maximum(num_pos, 1)
  has_pos = num_pos > 0
  loss = _global_mean(jnp.sum(jnp.where(has_pos, row, 0.0)), jnp.sum(has_pos), axis_name)
  return loss, _multi_positive_metrics(logits, own, valid, axis_name)


# ----------------------------------------------------------------------------- ring form


def _visit(x_blocks, y, col_bias):
  """LSE, max and first argmax of ``x @ yᵀ + col_bias`` over the visiting texts, per local image
  (row blocks of ``x_blocks [n_blocks, c, D]``; each ``[b]``)."""
  def block_step(_, x_blk):
    z = x_blk @ y.T + col_bias[None, :]  # [c, n]: the only logits ever held
    return None, (jax.nn.logsumexp(z, axis=1), jnp.max(z, axis=1), jnp.argmax(z, axis=1))

  _, stats = jax.lax.scan(block_step, None, x_blocks)
  return tuple(a.reshape(-1) for a in stats)


def _row_lse_argmax(xs, y, col_bias, axis_name, block_size):
  """Ring pass: per local row of ``xs [b, D]``, the LSE and the global argmax index of
  ``xs @ y_allᵀ + bias_all`` over every device's ``y [n, D]`` (rows may differ from ``b``)."""
  n = y.shape[0]
  size = ring.axis_size(axis_name)
  me = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  x_blocks = ring.row_blocks(xs, block_size)

  def merge(acc, k, visiting):
    lse, best, arg = acc
    blk_lse, blk_max, blk_arg = _visit(x_blocks, *visiting)
    blk_arg = ((me - k) % size) * n + blk_arg  # global index of the visiting text
    # Ties go to the lower global index, as a dense argmax does.
    better = (blk_max > best) | ((blk_max == best) & (blk_arg < arg))
    return (jnp.logaddexp(lse, blk_lse), jnp.maximum(best, blk_max),
            jnp.where(better, blk_arg, arg))

  def ring_step(carry, k):
    acc, visiting = carry
    return (merge(acc, k, visiting), ring.ring_shift(visiting, axis_name)), None

  # full_like keeps the inputs' device-varying type, as scan carries inside shard_map need.
  neg_inf = jnp.full_like(xs[:, 0], -jnp.inf)
  acc = (neg_inf, neg_inf, jnp.zeros_like(xs[:, 0], dtype=jnp.int32))
  (acc, visiting), _ = jax.lax.scan(ring_step, (acc, (y, col_bias)), jnp.arange(size - 1))
  lse, _, arg = merge(acc, size - 1, visiting)  # the last shard needs no further shift
  return lse, arg


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _masked_row_lse(xs, y, col_bias, axis_name, block_size):
  """``(lse [b], best [b] int32)`` of :func:`_row_lse_argmax`, with a custom gradient for
  ``lse`` that saves only ``xs``, ``y``, ``col_bias`` and ``lse``."""
  return _row_lse_argmax(xs, y, col_bias, axis_name, block_size)


def _masked_row_lse_fwd(xs, y, col_bias, axis_name, block_size):
  lse, best = _row_lse_argmax(xs, y, col_bias, axis_name, block_size)
  return (lse, best), (xs, y, col_bias, lse)


def _masked_row_lse_bwd(axis_name, block_size, residuals, cotangents):
  """Recomputes each block, ``dZ = g · softmax_rows(Z)``; a second ring carries each text's
  gradient accumulators (``y`` and bias) along with it, home after ``W`` shifts."""
  xs, y, col_bias, lse = residuals
  g = cotangents[0]
  x_blocks = ring.row_blocks(xs, block_size)
  n_blocks, c, _ = x_blocks.shape
  lse_blocks, g_blocks = lse.reshape(n_blocks, c), g.reshape(n_blocks, c)

  def ring_step(carry, _):
    gx_blocks, (y_v, bias_v, gy_v, gb_v) = carry

    def block_step(acc, inputs):
      gy_v, gb_v = acc
      x_blk, lse_blk, g_blk = inputs
      dz = g_blk[:, None] * jnp.exp(x_blk @ y_v.T + bias_v[None, :] - lse_blk[:, None])
      return (gy_v + dz.T @ x_blk, gb_v + jnp.sum(dz, axis=0)), dz @ y_v

    (gy_v, gb_v), gx_new = jax.lax.scan(block_step, (gy_v, gb_v),
                                        (x_blocks, lse_blocks, g_blocks))
    visiting = ring.ring_shift((y_v, bias_v, gy_v, gb_v), axis_name)
    return (gx_blocks + gx_new, visiting), None

  init = (jnp.zeros_like(x_blocks), (y, col_bias, jnp.zeros_like(y), jnp.zeros_like(col_bias)))
  (gx_blocks, (_, _, gy, gb)), _ = jax.lax.scan(ring_step, init, None,
                                                length=ring.axis_size(axis_name))
  return gx_blocks.reshape(xs.shape), gy, gb


_masked_row_lse.defvjp(_masked_row_lse_fwd, _masked_row_lse_bwd)


def ring_multi_positive_loss(image_emb, text_emb, logit_scale, *, text_valid=None,
                             block_size=None, axis_name=None):
  """:func:`multi_positive_loss` without materialising the ``[b, B·T]`` logits.

  Same contract, value, gradients and metrics. The flattened ``[b·T, D]`` texts travel the
  ``ppermute`` ring with an additive column bias (0, or ``MASKED_LOGIT`` for invalid texts);
  each device keeps only its images' running ``LSE_{j ∈ V} Z_ij`` and argmax. The positive
  term is local and closed-form, ``Σ_{p ∈ P_i} Z_ip = s x̂_i · Σ_{k valid} ŷ_ik``, and so are
  the logit metrics: the sum of all valid logits is ``(Σ_i s x̂_i) · (Σ_{j ∈ V} ŷ_j)``.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is given).
    text_emb: ``[b, T, D]`` the ``T`` texts of every image.
    logit_scale: scalar ``s = exp(θ)``.
    text_valid: optional bool ``[b, T]``; False texts are neither positives nor negatives.
    block_size: local images scored at once (must divide ``b``; None: all ``b``). Peak
      logits memory per device is ``block_size × b·T`` floats.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)`` as :func:`multi_positive_loss`.
  """
  x = common.l2_normalize(image_emb)
  y = common.l2_normalize(text_emb)
  b, t, d = y.shape
  if text_valid is None:
    text_valid = jnp.ones((b, t), bool)
  valid = jnp.asarray(text_valid).astype(bool)
  xs = jnp.asarray(logit_scale, jnp.float32) * x
  # zeros_like(y): the bias keeps the texts' device-varying type even when the mask does not.
  col_bias = jnp.where(valid, jnp.zeros_like(y[..., 0]), MASKED_LOGIT).reshape(b * t)
  lse, best = _masked_row_lse(xs, y.reshape(b * t, d), col_bias, axis_name, block_size)
  y_pos = jnp.sum(jnp.where(valid[..., None], y, 0.0), axis=1)  # [b, D]
  pos_sum = jnp.sum(xs * y_pos, axis=1)
  num_pos = jnp.sum(valid, axis=1)
  has_pos = num_pos > 0
  row = lse - pos_sum / jnp.maximum(num_pos, 1)
  loss = _global_mean(jnp.sum(jnp.where(has_pos, row, 0.0)), jnp.sum(has_pos), axis_name)

  # Metrics: the argmax is a global text index; its image is index // T.
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  hit = (best // t == rows).astype(jnp.float32)
  global_b = b * ring.axis_size(axis_name)
  num_valid = common.global_sum(jnp.sum(num_pos), axis_name)
  pos_total = common.global_sum(jnp.sum(pos_sum), axis_name)
  all_total = jnp.dot(common.global_sum(jnp.sum(xs, axis=0), axis_name),
                      common.global_sum(jnp.sum(y_pos, axis=0), axis_name))
  metrics = {
      "acc": _global_mean(jnp.sum(hit), b, axis_name),
      "pos_logit": pos_total / jnp.maximum(num_valid, 1),
      # Every valid text is a positive of exactly one image and a negative of the others.
      # float: (B − 1) · B·T overflows int32 at large batches.
      "neg_logit": (all_total - pos_total)
                   / jnp.maximum((global_b - 1) * num_valid.astype(jnp.float32), 1.0),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def circle_multi_positive_loss(image_emb, text_emb, *, gamma=32.0, margin=0.25, divisor=10.0,
                               text_valid=None, axis_name=None):
  """Multi-positive image→text Circle loss (the released code's form, METHODS.md §1.5 (b)).

  On cosines ``c`` of image ``i`` against all ``B·T`` texts (no logit scale):
  ``ℓ_i = softplus(LSE_p [−γ α_p (c_p − (1 − m))] + LSE_n [γ α_n (c_n − m)])`` with
  ``α_p = sg(max(0, 1 + m − c_p))``, ``α_n = sg(max(0, c_n + m))``, positives ``p`` the
  image's own valid texts and negatives ``n`` the other images' valid texts;
  ``L = mean_i ℓ_i / divisor`` over images with a valid text.

  Args:
    image_emb: ``[b, D]``; text_emb: ``[b, T, D]`` (local shards when ``axis_name`` is given).
    gamma: scale γ; margin: relaxation ``m``; divisor: the code's fixed ``10``.
    text_valid: optional bool ``[b, T]``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` as :func:`multi_positive_loss` (logit metrics are cosines).
  """
  sims, own, valid = _texts_against_images(image_emb, text_emb, text_valid, axis_name)
  pos = own & valid[None, :]
  neg = ~own & valid[None, :]
  alpha_p = jax.lax.stop_gradient(jax.nn.relu(1.0 + margin - sims))
  alpha_n = jax.lax.stop_gradient(jax.nn.relu(sims + margin))
  logit_p = jnp.where(pos, -gamma * alpha_p * (sims - (1.0 - margin)), MASKED_LOGIT)
  logit_n = jnp.where(neg, gamma * alpha_n * (sims - margin), MASKED_LOGIT)
  row = jax.nn.softplus(jax.nn.logsumexp(logit_p, axis=1) + jax.nn.logsumexp(logit_n, axis=1))
  has_pos = jnp.any(pos, axis=1)
  loss = _global_mean(jnp.sum(jnp.where(has_pos, row, 0.0)), jnp.sum(has_pos), axis_name)
  return loss / divisor, _multi_positive_metrics(sims, own, valid, axis_name)


def resolve_delta(delta: float, num_patches: int) -> float:
  """The grouping threshold: ``δ`` itself, or ``1/M`` when ``δ < 0`` (the code's convention)."""
  if delta > 1.0:
    raise ValueError(f"grouping delta={delta} > 1 would drop every patch (normalised "
                     "similarities lie in [0, 1]).")
  return 1.0 / num_patches if delta < 0 else float(delta)


def grouping_weights(text_emb, patch_tokens, *, delta=0.0):
  """Sub-caption-conditioned patch weights (METHODS.md §1.5 (c)).

  ``a_kp = t̂_k · p̂_p``; ``ã = (a − min_p a) / (max_p a − min_p a)``, or 1 everywhere when
  ``max − min ≤ MINMAX_EPS`` (all patches equally similar: uniform weights, where the
  released code divides 0 by ~0); ``ã ← 0`` where ``ã < δ``; ``w = ã / Σ_p ã``. The best
  patch always has ``ã = 1``, so the sum is ≥ 1 for ``δ ≤ 1``. Weights stay differentiable.

  Args:
    text_emb: ``[b, T, D]`` text embeddings.
    patch_tokens: ``[b, M, D]`` patch tokens of the same images.
    delta: threshold ``δ`` in ``[0, 1]``; ``δ < 0`` means ``1/M``.

  Returns:
    float32 ``[b, T, M]`` weights, each ``[i, k, :]`` summing to 1.
  """
  t = common.l2_normalize(text_emb)
  p = common.l2_normalize(patch_tokens)
  delta = resolve_delta(delta, p.shape[1])
  a = jnp.einsum("btd,bmd->btm", t, p)
  lo = jnp.min(a, axis=-1, keepdims=True)
  span = jnp.max(a, axis=-1, keepdims=True) - lo
  flat = span <= MINMAX_EPS
  a_norm = jnp.where(flat, 1.0, (a - lo) / jnp.where(flat, 1.0, span))
  a_norm = jnp.where(a_norm >= delta, a_norm, 0.0)
  return a_norm / jnp.sum(a_norm, axis=-1, keepdims=True)


def grouping_loss(text_emb, patch_tokens, logit_scale_local, *, delta=0.0, block_size=None,
                  axis_name=None):
  """Sub-caption-specific grouping loss (METHODS.md §1.5 (c)).

  Each text ``t_ik`` pools its own image's normalised patches,
  ``g_ik = normalize(Σ_p w_ikp p̂_ip)`` with :func:`grouping_weights`, and the ``B·T`` pairs
  ``(g_ik, t_ik)`` enter CLIP's symmetric InfoNCE at scale ``s_loc`` (every other pair of the
  global batch is a negative, the other texts of the same image included), in the
  memory-lean ring form.

  Args:
    text_emb: ``[b, T, D]`` text embeddings (local shard when ``axis_name`` is given).
    patch_tokens: ``[b, M, D]`` patch tokens of the same images.
    logit_scale_local: scalar ``s_loc = exp(θ_loc)``.
    delta: grouping threshold (see :func:`grouping_weights`).
    block_size: rows of local pairs scored at once (must divide ``b·T``; None: all).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` with ``ring_clip_loss``'s metrics over the ``B·T`` pairs
    (``i2t_acc`` is pooled-patches→text).
  """
  t = common.l2_normalize(text_emb)
  p = common.l2_normalize(patch_tokens)
  w = grouping_weights(t, p, delta=delta)
  pooled = jnp.einsum("btm,bmd->btd", w, p)
  b, k, d = t.shape
  return ring_clip_loss(pooled.reshape(b * k, d), t.reshape(b * k, d), logit_scale_local,
                        block_size=block_size, axis_name=axis_name)


MULTI_POSITIVE_FORMS = ("infonce", "circle")


def dreamlip_loss(image_emb, text_emb, patch_tokens, logit_scale, logit_scale_local, *,
                  multi_positive_weight=1.0, grouping_weight=1.0, delta=0.0,
                  multi_positive_form="infonce", text_valid=None, block_size=None,
                  axis_name=None):
  """DreamLIP's objective (METHODS.md §1.5):

  ``L = L_clip(x, t_·0) / T + w_mp · L_mpos(x, t) + w_g · L_group(t, P)``.

  The ``1/T`` on the CLIP term is the released code's (``CE_I→T + CE_T→I`` over ``2T``); with
  ``T = 1`` and both weights 0 the loss is CLIP's. Terms with weight 0 are not computed
  (``patch_tokens`` may then be None).

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is given).
    text_emb: ``[b, T, D]`` text embeddings; index 0 is the raw caption, 1.. sub-captions.
    patch_tokens: ``[b, M, D]`` image patch tokens (projected into the embedding space).
    logit_scale: scalar ``s`` of the CLIP and multi-positive terms.
    logit_scale_local: scalar ``s_loc`` of the grouping term.
    multi_positive_weight: ``w_mp``.
    grouping_weight: ``w_g`` (the code's ``sgl_lossweight``, default 1).
    delta: grouping threshold (the code's ``sgl_delta``, default 0).
    multi_positive_form: ``"infonce"`` (the paper's; :func:`ring_multi_positive_loss`, equal to
      the global-view :func:`multi_positive_loss`) or ``"circle"``
      (:func:`circle_multi_positive_loss`, released code; global view).
    text_valid: optional bool ``[b, T]`` for the multi-positive term.
    block_size: row block of the ring losses (local images for CLIP and the multi-positive
      term, local texts for grouping; None: all local rows at once).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: CLIP's metrics on the raw captions plus ``clip_loss``, and, when
    enabled, ``multi_positive_loss`` / ``multi_positive_acc`` and ``grouping_loss`` /
    ``grouping_acc``.
  """
  if multi_positive_form not in MULTI_POSITIVE_FORMS:
    raise ValueError(f"multi_positive_form={multi_positive_form!r}; expected one of "
                     f"{MULTI_POSITIVE_FORMS}.")
  num_texts = text_emb.shape[1]
  clip, metrics = ring_clip_loss(image_emb, text_emb[:, 0], logit_scale,
                                 block_size=block_size, axis_name=axis_name)
  loss = clip / num_texts
  metrics = dict(metrics, clip_loss=jax.lax.stop_gradient(clip))
  if multi_positive_weight:
    if multi_positive_form == "infonce":
      mpos, mpos_metrics = ring_multi_positive_loss(image_emb, text_emb, logit_scale,
                                                    text_valid=text_valid,
                                                    block_size=block_size, axis_name=axis_name)
    else:
      mpos, mpos_metrics = circle_multi_positive_loss(image_emb, text_emb,
                                                      text_valid=text_valid,
                                                      axis_name=axis_name)
    loss = loss + multi_positive_weight * mpos
    metrics["multi_positive_loss"] = jax.lax.stop_gradient(mpos)
    metrics["multi_positive_acc"] = mpos_metrics["acc"]
  if grouping_weight:
    group, group_metrics = grouping_loss(text_emb, patch_tokens, logit_scale_local, delta=delta,
                                         block_size=block_size, axis_name=axis_name)
    loss = loss + grouping_weight * group
    metrics["grouping_loss"] = jax.lax.stop_gradient(group)
    metrics["grouping_acc"] = group_metrics["i2t_acc"]
  return loss, metrics

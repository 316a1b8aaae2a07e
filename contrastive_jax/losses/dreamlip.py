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

The multi-positive terms hold ``[b, B·T]`` logits per device (they need every text's
similarity to the local images once; no ``[B·T, B·T]`` matrix is ever formed).
"""

from __future__ import annotations

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
    multi_positive_form: ``"infonce"`` (:func:`multi_positive_loss`, paper) or ``"circle"``
      (:func:`circle_multi_positive_loss`, released code).
    text_valid: optional bool ``[b, T]`` for the multi-positive term.
    block_size: row block of the ring losses (None: all local rows at once).
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
      mpos, mpos_metrics = multi_positive_loss(image_emb, text_emb, logit_scale,
                                               text_valid=text_valid, axis_name=axis_name)
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

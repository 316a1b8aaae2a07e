"""X-CLIP's multi-grained similarity (Ma et al., ACM MM 2022), METHODS.md §2.21, as a generic
image/video–text loss.

A visual sample has a pooled embedding ``v`` and fine-grained tokens ``F`` (video frames, or
image patches), a text a sentence embedding ``t`` and word tokens ``W``; all L2-normalised.
The score of a (text, visual) pair is the mean of four similarities:

* sentence–video ``⟨t, v⟩``;
* video–word ``AOSM_k ⟨w_k, v⟩`` and sentence–frame ``AOSM_l ⟨t, f_l⟩``;
* frame–word on ``S_kl = ⟨w_k, f_l⟩``: ``½ (AOSM_l AOSM_k S + AOSM_k AOSM_l S)`` (pool over words
  then frames, and over frames then words).

``AOSM`` (attention over similarity) pools a similarity vector with its own softmax,
``Σ_k a_k c_k`` with ``a = softmax(c / T) R`` (``T = 0.01``; ``R`` an optional learnable
``n × n`` re-weighting, identity by default). Unlike the reference code, padded tokens are
masked out of the softmax and of the sum (METHODS.md §3.3): padding never changes a score,
and a sample with no valid token pools to 0. As ``T → 0`` AOSM is the max over valid tokens
(FILIP-like), as ``T → ∞`` their mean.

The loss is CLIP's symmetric InfoNCE on ``s · score``, in pattern L: each device scores its
local rows against all-gathered columns (``[b, B, n_w, n_f]`` token similarities per
direction, the global view).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.clip import infonce_from_logits
from contrastive_jax.losses.supcon import MASKED


def aosm(sim, mask, *, temperature=0.01, reweight=None):
  """Attention-over-similarity pooling of ``sim`` along its last axis.

  Args:
    sim: float ``[..., n]`` similarities.
    mask: bool, broadcastable to ``sim``; True on valid tokens.
    temperature: softmax temperature ``T``.
    reweight: optional float ``[n, n]`` matrix ``R`` applied to the softmax weights
      (``a ← a R``; X-CLIP's learnable weights, identity at init). Masked positions get weight
      0 after it.

  Returns:
    float32 ``[...]``: ``Σ_k a_k sim_k`` over the valid ``k`` (0 when none is valid).
  """
  sim = sim.astype(jnp.float32)
  mask = jnp.broadcast_to(mask, sim.shape)
  weights = jax.nn.softmax(jnp.where(mask, sim / temperature, MASKED), axis=-1)
  if reweight is not None:
    weights = weights @ jnp.asarray(reweight, jnp.float32)
  weights = jnp.where(mask, weights, 0.0)
  return jnp.sum(weights * jnp.where(mask, sim, 0.0), axis=-1)


def xclip_scores(text_emb, word_tokens, word_mask, visual_emb, frame_tokens, frame_mask, *,
                 temperature=0.01, word_weight=None, frame_weight=None):
  """Multi-grained scores of every text against every visual sample (module docstring).

  Args:
    text_emb: ``[n, D]`` sentence embeddings.
    word_tokens: ``[n, n_w, D]`` word tokens; ``word_mask`` bool ``[n, n_w]``.
    visual_emb: ``[m, D]`` pooled visual embeddings.
    frame_tokens: ``[m, n_f, D]`` frame / patch tokens; ``frame_mask`` bool ``[m, n_f]``.
    temperature: AOSM temperature ``T``.
    word_weight: optional ``[n_w, n_w]`` re-weighting of the softmax over words.
    frame_weight: optional ``[n_f, n_f]`` re-weighting of the softmax over frames.

  Returns:
    float32 ``[n, m]`` scores in ``[−1, 1]``.
  """
  t, v = common.l2_normalize(text_emb), common.l2_normalize(visual_emb)
  w, f = common.l2_normalize(word_tokens), common.l2_normalize(frame_tokens)
  wm, fm = word_mask.astype(bool), frame_mask.astype(bool)
  pool = dict(temperature=temperature)
  sentence_video = t @ v.T
  video_word = aosm(jnp.einsum("nkd,md->nmk", w, v), wm[:, None, :], reweight=word_weight,
                    **pool)
  sentence_frame = aosm(jnp.einsum("nd,mld->nml", t, f), fm[None, :, :],
                        reweight=frame_weight, **pool)
  s = jnp.einsum("nkd,mld->nmkl", w, f)  # [n, m, n_w, n_f]
  over_words = aosm(jnp.swapaxes(s, -1, -2), wm[:, None, None, :], reweight=word_weight,
                    **pool)  # [n, m, n_f]
  over_frames = aosm(s, fm[None, :, None, :], reweight=frame_weight, **pool)  # [n, m, n_w]
  frame_word = 0.5 * (aosm(over_words, fm[None, :, :], reweight=frame_weight, **pool)
                      + aosm(over_frames, wm[:, None, :], reweight=word_weight, **pool))
  return (sentence_video + video_word + sentence_frame + frame_word) / 4.0


def xclip_loss(image_emb, image_tokens, image_mask, text_emb, text_tokens, text_mask,
               logit_scale, *, temperature=0.01, word_weight=None, frame_weight=None,
               axis_name=None):
  """Symmetric InfoNCE on ``s · xclip_scores`` over the global batch.

  Args:
    image_emb: ``[b, D]`` pooled image (video) embeddings, local shard when ``axis_name``
      is set; ``image_tokens`` ``[b, n_f, D]`` and ``image_mask`` bool ``[b, n_f]``.
    text_emb: ``[b, D]`` sentence embeddings paired row by row; ``text_tokens``
      ``[b, n_w, D]`` and ``text_mask`` bool ``[b, n_w]``.
    logit_scale: scalar ``s = exp(θ)``.
    temperature, word_weight, frame_weight: see :func:`xclip_scores`.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` as :func:`contrastive_jax.losses.clip.clip_loss`.
  """
  kw = dict(temperature=temperature, word_weight=word_weight, frame_weight=frame_weight)
  gather = lambda x: common.all_gather_rows(x, axis_name)  # noqa: E731
  image_mask, text_mask = image_mask.astype(jnp.int32), text_mask.astype(jnp.int32)
  scale = jnp.asarray(logit_scale, jnp.float32)
  # Image rows against every text (columns), text rows against every image.
  logits_i2t = scale * xclip_scores(gather(text_emb), gather(text_tokens), gather(text_mask),
                                    image_emb, image_tokens, image_mask, **kw).T
  logits_t2i = scale * xclip_scores(text_emb, text_tokens, text_mask, gather(image_emb),
                                    gather(image_tokens), gather(image_mask), **kw)
  labels = common.shard_offset(image_emb.shape[0], axis_name) + jnp.arange(image_emb.shape[0])
  return infonce_from_logits(logits_i2t, logits_t2i, labels, axis_name=axis_name)

"""FILIP's token-wise late-interaction contrastive loss (Yao et al., 2022), METHODS.md §1.3.

``filip_loss`` is the global-view form with local rows against all-gathered token tensors
(pattern L): each device holds ``[b, B, T, T']`` token similarities per direction. A
memory-lean (chunked / ring) form is tested against it.

Padding follows the paper, not the MindSpore re-implementation: padded tokens are zeroed,
their similarities are replaced by a large negative finite value before the max (so they
can never be picked), and they are left out of the mean (count clipped at ≥ 1). A sample
with no valid token at all scores 0 against everything and gets zero gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.clip import infonce_from_logits

# Stands in for a padded token's similarity before the max: far below any cosine, finite so
# fully masked rows stay NaN-free.
MASKED_SIMILARITY = -1e9


def late_interaction_scores(query_tokens, query_mask, key_tokens, key_mask):
  """Mean over valid query tokens of the max over valid key tokens of the token cosines.

  ``score[n, m] = (1/|Q_n|) Σ_{q ∈ Q_n} max_{k ∈ K_m} ⟨q̂_nq, k̂_mk⟩`` with ``Q_n``, ``K_m`` the
  valid tokens. A key sample with no valid token gives a max of 0; a query sample with no
  valid token gives a score of 0. Padded tokens get exactly zero gradient.

  Args:
    query_tokens: ``[n, Tq, D]`` L2-normalised float32 tokens, padded ones zeroed.
    query_mask: bool ``[n, Tq]``, True for valid tokens.
    key_tokens: ``[m, Tk, D]`` L2-normalised float32 tokens, padded ones zeroed.
    key_mask: bool ``[m, Tk]``.

  Returns:
    float32 ``[n, m]`` scores in ``[−1, 1]``.
  """
  sim = jnp.einsum("nqd,mkd->nmqk", query_tokens, key_tokens)
  sim = jnp.where(key_mask[None, :, None, :], sim, MASKED_SIMILARITY)
  best = jnp.max(sim, axis=-1)  # [n, m, Tq]: best key token for every query token.
  best = jnp.where(jnp.any(key_mask, axis=-1)[None, :, None], best, 0.0)
  best = jnp.where(query_mask[:, None, :], best, 0.0)
  count = jnp.maximum(jnp.sum(query_mask, axis=-1), 1).astype(jnp.float32)
  return jnp.sum(best, axis=-1) / count[:, None]


def num_kept_tokens(num_tokens: int, keep: float) -> int:
  """``keep · num_tokens`` rounded half up, at least 1 (static)."""
  return max(1, min(num_tokens, math.floor(keep * num_tokens + 0.5)))


def sample_image_tokens(image_tokens, image_mask, keep, rng, *, axis_name=None):
  """Random token reduction: keeps ``num_kept_tokens(T, keep)`` tokens of every image.

  For the image with *global* batch index ``g`` the key is ``jax.random.fold_in(rng, g)``;
  it draws one ``uniform[0, 1)`` number per token, valid tokens rank above padded ones, and
  the ``K`` highest-ranked tokens are kept, in their original order. So the kept set is a
  uniformly random ``K``-subset of the valid tokens (plus padded slots, still masked, when an
  image has fewer than ``K`` valid tokens). The choice depends only on ``rng`` and ``g``:
  pass the same ``rng`` to every device and the sharded selection equals the single-device
  one on the concatenated batch, while different images (hence devices) still draw
  different tokens. Draw a fresh ``rng`` every step.

  Args:
    image_tokens: ``[b, T, D]`` image tokens, any dtype (local shard when ``axis_name`` is set).
    image_mask: bool ``[b, T]``, True for valid tokens.
    keep: fraction in ``(0, 1]``.
    rng: a PRNG key, the same on every device.
    axis_name: mapped data axis (for the global row index), or None.

  Returns:
    ``(tokens, mask)`` of shapes ``[b, K, D]`` and ``[b, K]``. Dropped tokens get zero gradient.
  """
  b, t = image_mask.shape
  k = num_kept_tokens(t, keep)
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  keys = jax.vmap(lambda g: jax.random.fold_in(rng, g))(rows)
  noise = jax.vmap(lambda key: jax.random.uniform(key, (t,)))(keys)
  rank = jnp.where(image_mask, noise + 1.0, noise)  # every valid token beats every padded one.
  _, idx = jax.lax.top_k(rank, k)
  idx = jnp.sort(idx, axis=-1)
  tokens = jnp.take_along_axis(image_tokens, idx[..., None], axis=1)
  mask = jnp.take_along_axis(image_mask, idx, axis=1)
  return tokens, mask


def reduce_image_tokens(image_tokens, image_mask, keep, rng, *, axis_name=None):
  """Validates ``keep`` and applies :func:`sample_image_tokens` when it is below 1.

  Returns ``(image_tokens, image_mask)``; ``image_mask`` stays None when it was None and no
  token is dropped.
  """
  if keep is None:
    return image_tokens, image_mask
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"keep_image_tokens={keep}; expected a fraction in (0, 1].")
  if keep == 1.0:
    return image_tokens, image_mask
  if rng is None:
    raise ValueError("keep_image_tokens < 1 needs an rng key.")
  if image_mask is None:
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
  return sample_image_tokens(image_tokens, jnp.asarray(image_mask, bool), keep, rng,
                             axis_name=axis_name)


def prepare_tokens(tokens, mask):
  """Zeroes padded tokens (before normalising, so even NaN padding stays inert), then L2-normalises."""
  tokens = jnp.where(mask[..., None], tokens, jnp.zeros((), tokens.dtype))
  return common.l2_normalize(tokens)


def filip_scores(image_tokens, text_tokens, text_mask, *, image_mask=None, axis_name=None):
  """Image->text and text->image late-interaction scores of the local rows against the global batch.

  Args:
    image_tokens: ``[b, T_img, D]`` image tokens (local shard when ``axis_name`` is set), any float dtype.
    text_tokens: ``[b, T_txt, D]`` paired text tokens.
    text_mask: bool ``[b, T_txt]``, True for valid (non-padding) tokens.
    image_mask: bool ``[b, T_img]`` or None (all valid).
    axis_name: mapped axis to gather over, or None for a single device.

  Returns:
    ``(scores_i2t, scores_t2i, labels)``: float32 ``[b, B]`` each and int32 ``[b]``.
    ``scores_i2t[i, j]`` averages over the valid tokens of local image ``i`` the best match
    among the tokens of text ``j``; ``scores_t2i[j, i]`` averages over the valid tokens of
    local text ``j`` the best match among the tokens of image ``i``. The two are not
    transposes of each other.
  """
  text_mask = jnp.asarray(text_mask, bool)
  if image_mask is None:
    image_mask = jnp.ones(image_tokens.shape[:2], bool)
  image_mask = jnp.asarray(image_mask, bool)
  x = prepare_tokens(image_tokens, image_mask)
  y = prepare_tokens(text_tokens, text_mask)
  x_all = common.all_gather_rows(x, axis_name)
  y_all = common.all_gather_rows(y, axis_name)
  image_mask_all = common.all_gather_rows(image_mask, axis_name)
  text_mask_all = common.all_gather_rows(text_mask, axis_name)
  scores_i2t = late_interaction_scores(x, image_mask, y_all, text_mask_all)
  scores_t2i = late_interaction_scores(y, text_mask, x_all, image_mask_all)
  labels = common.shard_offset(x.shape[0], axis_name) + jnp.arange(x.shape[0])
  return scores_i2t, scores_t2i, labels


def filip_loss(image_tokens, text_tokens, text_mask, logit_scale, *, image_mask=None,
               keep_image_tokens=None, rng=None, axis_name=None):
  """Symmetric InfoNCE over token-wise late-interaction similarities of the global batch.

  ``L = ½ (mean_i CE(s · A_i·, i) + mean_j CE(s · C_j·, j))`` where ``A_ij`` is the mean over
  the valid tokens of image ``i`` of their best cosine with a valid token of text ``j``
  (softmax over texts) and ``C_ji`` the mean over the valid tokens of text ``j`` of their
  best cosine with a valid token of image ``i`` (softmax over images); ``C ≠ Aᵀ`` in
  general. Every token is L2-normalised inside, in float32. With one valid token per side
  this is :func:`contrastive_jax.losses.clip.clip_loss`.

  Args:
    image_tokens: ``[b, T_img, D]`` image tokens, the local shard when ``axis_name`` is given.
    text_tokens: ``[b, T_txt, D]`` text tokens paired row by row with ``image_tokens``.
    text_mask: bool ``[b, T_txt]``, True for valid tokens (padding False).
    logit_scale: scalar ``s = exp(θ)`` (the scale itself, not its log).
    image_mask: bool ``[b, T_img]``, or None when every image token is valid.
    keep_image_tokens: optional fraction in ``(0, 1]``: before the gather, keep a uniformly
      random ``round(keep · T_img)`` (≥ 1) of every image's valid tokens, see
      :func:`sample_image_tokens`. None or 1.0 keeps all.
    rng: PRNG key for the token reduction, the same on every device; required when
      ``keep_image_tokens < 1``.
    axis_name: name of the mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. each local input equals the single-device gradient on the concatenated
    batch (given the same ``rng``); ``metrics`` holds ``i2t_acc``, ``t2i_acc`` (in-batch
    top-1), ``pos_logit`` and ``neg_logit`` (mean positive / off-diagonal image->text logit).
  """
  image_tokens, image_mask = reduce_image_tokens(image_tokens, image_mask, keep_image_tokens,
                                                rng, axis_name=axis_name)
  scores_i2t, scores_t2i, labels = filip_scores(
      image_tokens, text_tokens, text_mask, image_mask=image_mask, axis_name=axis_name)
  scale = jnp.asarray(logit_scale, jnp.float32)
  return infonce_from_logits(scale * scores_i2t, scale * scores_t2i, labels,
                             axis_name=axis_name)

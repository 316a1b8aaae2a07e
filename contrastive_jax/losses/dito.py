"""DITO's region-text contrastive loss (Kim, Angelova, Kuo, 2023), METHODS.md §2.8.

DITO pretrains a detector's heads with language supervision by contrasting text with
*region* features pooled from (multi-level) feature maps over whole-image and other boxes.
Here the generic piece: box pooling of dense features and a CLIP loss between the pooled
regions and their phrases over the global batch (pattern L: local regions against
all-gathered regions / phrases).

Choices where METHODS.md says [unverified]: RoIAlign is replaced by exact area-weighted
average pooling (each feature cell weighs by the fraction of its area inside the box; a box
covering the image gives the plain mean of the map, so one whole-image box per image reduces
to CLIP on mean-pooled features), levels are combined by ``mean`` or ``max`` of the per-level
pooled features, and padded regions are excluded from both rows and columns.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

LEVEL_REDUCTIONS = ("mean", "max")


def _overlap(lo, hi, n: int):
  """``[..., n]``: the length of ``[lo, hi]`` inside each of ``n`` equal cells of ``[0, 1]``,
  in cell units (1 for a covered cell)."""
  edges = jnp.arange(n + 1, dtype=jnp.float32) / n
  left = jnp.maximum(lo[..., None], edges[:-1])
  right = jnp.minimum(hi[..., None], edges[1:])
  return jnp.maximum(right - left, 0.0) * n


def box_pool(features, boxes) -> jax.Array:
  """Area-weighted average of a feature map inside each box.

  Args:
    features: float ``[b, h, w, E]`` feature map (cell ``(i, j)`` covers
      ``[i/h, (i+1)/h] × [j/w, (j+1)/w]`` of the normalised image).
    boxes: float ``[b, R, 4]`` normalised ``(ymin, xmin, ymax, xmax)``.

  Returns:
    float32 ``[b, R, E]``; an empty box pools to zeros.
  """
  features = jnp.asarray(features, jnp.float32)
  _, h, w, _ = features.shape
  boxes = jnp.clip(jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32)), 0.0, 1.0)
  wy = _overlap(boxes[..., 0], boxes[..., 2], h)  # [b, R, h]
  wx = _overlap(boxes[..., 1], boxes[..., 3], w)  # [b, R, w]
  total = wy.sum(-1) * wx.sum(-1)  # [b, R]
  pooled = jnp.einsum("bri,brj,bije->bre", wy, wx, features)
  return pooled / jnp.maximum(total, 1e-12)[..., None]


def region_embeddings(feature_maps: Union[jax.Array, Sequence[jax.Array]], boxes, *,
                      level_reduce: str = "mean") -> jax.Array:
  """Box-pooled region features ``[b, R, E]`` of one map or of pyramid levels (combined by
  ``level_reduce``, ``"mean"`` or ``"max"``, over the per-level pooled features)."""
  if level_reduce not in LEVEL_REDUCTIONS:
    raise ValueError(f"level_reduce={level_reduce!r}; expected one of {LEVEL_REDUCTIONS}.")
  maps = [feature_maps] if hasattr(feature_maps, "ndim") else list(feature_maps)
  pooled = jnp.stack([box_pool(m, boxes) for m in maps])
  return pooled.mean(0) if level_reduce == "mean" else pooled.max(0)


def region_text_loss(feature_maps, boxes, region_mask, text_emb, logit_scale, *,
                     level_reduce: str = "mean", i2t_weight: float = 0.5, axis_name=None):
  """Symmetric InfoNCE between box-pooled regions and their phrases over the global batch.

  Every valid region of every image is a row (region→text) and a column (text→region)
  candidate; ``Z = s · r̂ t̂ᵀ`` over the ``M`` valid regions of the global batch,
  ``L = w · mean_i CE(Z_i·, i) + (1 − w) · mean_j CE(Z_·j, j)``.

  Args:
    feature_maps: float ``[b, h, w, E]`` dense features in the joint space (e.g. projected
      patch tokens as a grid), or a sequence of such maps at several resolutions.
    boxes: float ``[b, R, 4]`` normalised ``(ymin, xmin, ymax, xmax)`` (no gradient).
    region_mask: bool ``[b, R]``, False for padding regions.
    text_emb: float ``[b, R, E]`` embedding of each region's phrase.
    logit_scale: scalar ``s`` (already exponentiated).
    level_reduce: ``"mean"`` or ``"max"`` over levels (see :func:`region_embeddings`).
    i2t_weight: weight ``w`` of the region→text direction.
    axis_name: mapped data axis (inside ``shard_map``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global loss, the same on every device, with exact
    global gradients; ``metrics``: ``i2t_acc``, ``t2i_acc``, ``num_regions`` (``M``).
  """
  regions = region_embeddings(feature_maps, boxes, level_reduce=level_reduce)
  b, r, e = regions.shape
  x = common.l2_normalize(regions.reshape(b * r, e))
  y = common.l2_normalize(jnp.asarray(text_emb).reshape(b * r, e))
  valid = jnp.asarray(region_mask, bool).reshape(b * r)
  x_all = common.all_gather_rows(x, axis_name)
  y_all = common.all_gather_rows(y, axis_name)
  valid_all = common.all_gather_rows(valid, axis_name)
  scale = jnp.asarray(logit_scale, jnp.float32)
  labels = common.shard_offset(b * r, axis_name) + jnp.arange(b * r)
  neg = jnp.finfo(jnp.float32).min

  def direction(anchors, cands):
    logits = jnp.where(valid_all[None, :], scale * anchors @ cands.T, neg)
    positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    xent = jnp.where(valid, jax.nn.logsumexp(logits, axis=1) - positive, 0.0)
    hit = jnp.where(valid, jnp.argmax(logits, axis=1) == labels, False)
    return jnp.sum(xent), jnp.sum(hit.astype(jnp.float32))

  xent_i2t, hit_i2t = direction(x, y_all)
  xent_t2i, hit_t2i = direction(y, x_all)
  count = jnp.maximum(common.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name), 1.0)
  loss = common.global_sum(i2t_weight * xent_i2t + (1 - i2t_weight) * xent_t2i,
                           axis_name) / count
  metrics = {"i2t_acc": common.global_sum(hit_i2t, axis_name) / count,
             "t2i_acc": common.global_sum(hit_t2i, axis_name) / count,
             "num_regions": count}
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

"""CLIP's symmetric InfoNCE (Radford et al., 2021), METHODS.md §1.1.

``clip_loss`` is the global-view form with local rows against all-gathered columns
(pattern L): each device holds a ``[b, B]`` block of logits per direction. The memory-lean
ring/chunked form (issue 3) sits beside it in this package and is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def clip_logits(image_emb, text_emb, logit_scale, *, axis_name=None):
  """Image->text and text->image logits of the local rows against the global batch.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is set), any float dtype.
    text_emb: ``[b, D]`` paired text embeddings.
    logit_scale: scalar scale ``s`` (already exponentiated).
    axis_name: mapped axis to gather over, or None for a single device.

  Returns:
    ``(logits_i2t, logits_t2i, labels)``: float32 ``[b, B]`` each, and int32 ``[b]`` global
    indices of the positives.
  """
  x = common.l2_normalize(image_emb)
  y = common.l2_normalize(text_emb)
  x_all = common.all_gather_rows(x, axis_name)
  y_all = common.all_gather_rows(y, axis_name)
  scale = jnp.asarray(logit_scale, jnp.float32)
  logits_i2t = scale * x @ y_all.T
  logits_t2i = scale * y @ x_all.T
  labels = common.shard_offset(x.shape[0], axis_name) + jnp.arange(x.shape[0])
  return logits_i2t, logits_t2i, labels


def _row_stats(logits, labels, label_smoothing=0.0):
  """Per-row cross-entropy, top-1 hit and positive logit for integer ``labels``.

  With ``ε = label_smoothing`` the target is ``(1 − ε)·onehot + ε/B`` (over the ``B``
  columns), so the cross-entropy is ``LSE − (1 − ε)·z_pos − ε·mean_k z_k``.
  """
  positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  xent = jax.nn.logsumexp(logits, axis=1) - positive
  if label_smoothing:
    xent = xent + label_smoothing * (positive - jnp.mean(logits, axis=1))
  hit = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
  return xent, hit, positive


def clip_loss(image_emb, text_emb, logit_scale, *, i2t_weight=0.5, label_smoothing=0.0,
              axis_name=None):
  """Symmetric InfoNCE over the global batch.

  ``L = w · mean_i CE(Z_i·, i) + (1 − w) · mean_j CE(Z_·j, j)`` with ``Z = s · x̂ ŷᵀ`` over
  all ``B`` pairs and ``w = i2t_weight`` (½: CLIP; ConVIRT's λ otherwise). Embeddings are
  L2-normalised inside, in float32.

  Args:
    image_emb: ``[b, D]`` image embeddings, the local shard when ``axis_name`` is given.
    text_emb: ``[b, D]`` text embeddings paired row by row with ``image_emb``.
    logit_scale: scalar ``s = exp(θ)`` (the scale itself, not its log).
    i2t_weight: weight of the image→text direction; the text→image one gets ``1 − w``.
    label_smoothing: ``ε``; each row's target becomes ``(1 − ε)·onehot + ε/B``, i.e.
      ``CE_ε = (1 − ε)·CE + ε·mean_k(−log p_k)`` (CLIP🚀's local terms use 0.1).
    axis_name: name of the mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. each local input equals the single-device gradient on the concatenated
    batch; ``metrics`` holds ``i2t_acc``, ``t2i_acc`` (in-batch top-1), ``pos_logit`` and
    ``neg_logit`` (mean positive / off-diagonal logit).
  """
  logits_i2t, logits_t2i, labels = clip_logits(
      image_emb, text_emb, logit_scale, axis_name=axis_name)
  return infonce_from_logits(logits_i2t, logits_t2i, labels, i2t_weight=i2t_weight,
                             label_smoothing=label_smoothing, axis_name=axis_name)


def infonce_from_logits(logits_i2t, logits_t2i, labels, *, i2t_weight=0.5, label_smoothing=0.0,
                        axis_name=None):
  """Two-direction InfoNCE and its metrics from local-row logits (shared by CLIP and FILIP).

  Args:
    logits_i2t: float32 ``[b, B]`` image-anchored logits of the local rows.
    logits_t2i: float32 ``[b, B]`` text-anchored logits of the local rows.
    labels: int ``[b]`` global column index of each row's positive.
    i2t_weight: weight ``w`` of the image→text direction; text→image gets ``1 − w``.
    label_smoothing: ``ε`` of the smoothed targets (see :func:`clip_loss`).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` as :func:`clip_loss` describes them.
  """
  global_b = logits_i2t.shape[1]
  xent_i2t, hit_i2t, pos = _row_stats(logits_i2t, labels, label_smoothing)
  xent_t2i, hit_t2i, _ = _row_stats(logits_t2i, labels, label_smoothing)

  def mean(local_sum, count):
    return common.global_sum(local_sum, axis_name) / count

  loss = mean(i2t_weight * jnp.sum(xent_i2t) + (1 - i2t_weight) * jnp.sum(xent_t2i), global_b)
  num_neg = float(global_b) * (global_b - 1)  # float: B² overflows int32
  metrics = {
      "i2t_acc": mean(jnp.sum(hit_i2t), global_b),
      "t2i_acc": mean(jnp.sum(hit_t2i), global_b),
      "pos_logit": mean(jnp.sum(pos), global_b),
      "neg_logit": mean(jnp.sum(logits_i2t) - jnp.sum(pos), num_neg) if num_neg else 0.0,
  }
  metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
  return loss, metrics


def convirt_loss(image_emb, text_emb, *, temperature=0.1, i2t_weight=0.75, axis_name=None):
  """ConVIRT (METHODS.md §1.15): CLIP's loss at a fixed scale ``1/τ`` with the image→text
  direction weighted ``λ = i2t_weight`` and text→image ``1 − λ``; no intra-modal negatives.
  Shapes, contract and metrics as :func:`clip_loss`."""
  return clip_loss(image_emb, text_emb, 1.0 / temperature, i2t_weight=i2t_weight,
                   axis_name=axis_name)

"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023), METHODS.md §1.2.

``siglip_loss`` is the global-view form with local rows against all-gathered columns
(pattern L): each device holds a ``[b, B]`` block of logits, and the blocks of all devices
tile the global ``B × B`` matrix exactly once. The memory-lean ring form (pattern R,
``ppermute`` of text shards) is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def siglip_logits(image_emb, text_emb, logit_scale, logit_bias, *, axis_name=None):
  """Sigmoid logits of the local images against the texts of the global batch.

  Args:
    image_emb: ``[b, D]`` image embeddings (local shard when ``axis_name`` is set), any float dtype.
    text_emb: ``[b, D]`` paired text embeddings.
    logit_scale: scalar scale ``t = exp(t')`` (already exponentiated).
    logit_bias: scalar bias ``b``.
    axis_name: mapped axis to gather over, or None for a single device.

  Returns:
    ``(logits, labels)``: float32 ``[b, B]`` logits ``t · x̂_i · ŷ_j + b`` and int32 ``[b]``
    global column indices of the positives.
  """
  x = common.l2_normalize(image_emb)
  y_all = common.all_gather_rows(common.l2_normalize(text_emb), axis_name)
  scale = jnp.asarray(logit_scale, jnp.float32)
  bias = jnp.asarray(logit_bias, jnp.float32)
  logits = scale * x @ y_all.T + bias
  labels = common.shard_offset(x.shape[0], axis_name) + jnp.arange(x.shape[0])
  return logits, labels


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, axis_name=None):
  """Pairwise sigmoid loss over all ``B × B`` image-text pairs of the global batch.

  ``L = −(1/B) Σ_i Σ_j log σ(ℓ_ij · Z_ij)`` with ``Z_ij = t · x̂_i · ŷ_j + b``, ``ℓ_ij = +1``
  for the paired ``i = j`` and ``−1`` otherwise. The sum over pairs is normalised by the
  global batch size ``B`` (the number of images), not by ``B²``, as in the paper and
  big_vision. The loss is symmetric in the two modalities, so there is no second direction.
  At init (``t = 10``, ``b = −10``) with all cosines 0 it is ``softplus(10) + (B−1)·softplus(−10)``.
  No clamp is applied to ``t`` (big_vision); clamping, if wanted, belongs to the train step.

  Args:
    image_emb: ``[b, D]`` image embeddings, the local shard when ``axis_name`` is given.
    text_emb: ``[b, D]`` text embeddings paired row by row with ``image_emb``.
    logit_scale: scalar ``t = exp(t')`` (the scale itself; the model's ``t'`` starts at ln 10).
    logit_bias: scalar ``b`` (starts at −10).
    axis_name: name of the mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. each local input equals the single-device gradient on the concatenated
    batch; ``metrics`` holds ``i2t_acc``, ``t2i_acc`` (in-batch top-1 retrieval),
    ``pos_logit`` and ``neg_logit`` (mean positive / off-diagonal logit) and ``pos_prob``
    (mean ``σ`` of the positive logits).
  """
  logits, labels = siglip_logits(
      image_emb, text_emb, logit_scale, logit_bias, axis_name=axis_name)
  global_b = logits.shape[1]
  is_pos = labels[:, None] == jnp.arange(global_b)[None, :]
  signs = jnp.where(is_pos, 1.0, -1.0)
  loss = common.global_sum(-jnp.sum(jax.nn.log_sigmoid(signs * logits)), axis_name) / global_b

  def mean(local_sum, count):
    return common.global_sum(local_sum, axis_name) / count

  # Text-anchored rows only for the t2i accuracy: recomputed without gradient.
  logits_t2i, _ = siglip_logits(
      jax.lax.stop_gradient(text_emb), jax.lax.stop_gradient(image_emb),
      logit_scale, logit_bias, axis_name=axis_name)
  logits_t2i = jax.lax.stop_gradient(logits_t2i)
  pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  hit_i2t = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
  hit_t2i = (jnp.argmax(logits_t2i, axis=1) == labels).astype(jnp.float32)
  num_neg = float(global_b) * (global_b - 1)  # float: B² overflows int32
  metrics = {
      "i2t_acc": mean(jnp.sum(hit_i2t), global_b),
      "t2i_acc": mean(jnp.sum(hit_t2i), global_b),
      "pos_logit": mean(jnp.sum(pos), global_b),
      "neg_logit": mean(jnp.sum(logits) - jnp.sum(pos), num_neg) if num_neg else 0.0,
      "pos_prob": mean(jnp.sum(jax.nn.sigmoid(pos)), global_b),
  }
  metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
  return loss, metrics

"""ProtoCLIP's prototype losses and prototypical back translation (METHODS.md §1.4).

Pure functions on arrays (jax only). The centroids come from k-means
(:mod:`contrastive_jax.losses.kmeans`) once per episode and enter here as constants; the
objective :mod:`contrastive_jax.objectives.protoclip` keeps them in its state.

With ``p^I = normalize(g_I(x))``, ``p^T = normalize(g_T(y))`` (projections of the
unnormalised CLIP embeddings), ``s_p`` the prototype scale, ``C^I, C^T`` the k-means centroids
of each modality and ``C^{I←T}, C^{T←I}`` the back-translated ones:

    L_i2t = mean_i CE( s_p · p^I_i · C^{I←T}ᵀ ,  softmax(C^T_{y^T_i} · C^Tᵀ / τ_t) )
    L_t2i = mean_i CE( s_p · p^T_i · C^{T←I}ᵀ ,  softmax(C^I_{y^I_i} · C^Iᵀ / τ_t) )
    L_proto = ½ (L_i2t + L_t2i)

The means run over the global batch; every term is per sample, so each device scores its
local rows against the replicated ``[K, d_p]`` tables and one ``psum`` gives the global loss,
whose gradient w.r.t. the local inputs equals the single-device gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def back_translate(other_features, assignments, num_clusters, *, axis_name=None):
  """Prototypical back translation: each cluster's mean of the *other* modality's features.

  ``C^{I←T}_k = mean{ P^I_e : y^T_e = k }`` is ``back_translate(P^I, y^T, K)``.

  Args:
    other_features: ``[n, d]`` features of the other modality (local rows), row-aligned with
      ``assignments``; used as constants.
    assignments: int ``[n]`` cluster index in ``[0, K)`` of each row (in this modality).
    num_clusters: ``K``.
    axis_name: mapped axis the rows are sharded over, or None.

  Returns:
    float32 ``[K, d]``, identical on every device; a cluster without rows is a zero row
    (its logit is then 0 for every sample).
  """
  x = jax.lax.stop_gradient(other_features).astype(jnp.float32)
  sums = jax.ops.segment_sum(x, assignments, num_segments=num_clusters)
  counts = jax.ops.segment_sum(jnp.ones_like(x[:, 0]), assignments, num_segments=num_clusters)
  sums = common.global_sum(sums, axis_name)
  counts = common.global_sum(counts, axis_name)
  return sums / jnp.maximum(counts, 1.0)[:, None]


def soft_targets(centroids, assignments, temperature):
  """Structure-aware targets ``softmax(C_{y_i} · Cᵀ / τ_t)``, ``[b, K]`` float32.

  Args:
    centroids: ``[K, d]`` teacher centroids ``C``.
    assignments: int ``[b]`` teacher cluster ``y_i`` of each sample.
    temperature: ``τ_t`` (static); ``τ_t ≤ 0`` gives one-hot targets at ``y_i``.

  Returns:
    Rows summing to 1, under stop-gradient.
  """
  c = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  if temperature <= 0:
    return jax.nn.one_hot(assignments, c.shape[0], dtype=jnp.float32)
  return jax.nn.softmax(c[assignments] @ c.T / temperature, axis=-1)


def _cross_entropy(logits, targets):
  """Per-row ``−Σ_k t_k log softmax(logits)_k``."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _student_logits(proj, proto_scale, centroids):
  scale = jnp.asarray(proto_scale, jnp.float32)
  return scale * common.l2_normalize(proj) @ jax.lax.stop_gradient(centroids).astype(
      jnp.float32).T


def _global_mean(local_values, axis_name):
  global_b = local_values.shape[0] * (1 if axis_name is None else jax.lax.axis_size(axis_name))
  return common.global_sum(jnp.sum(local_values), axis_name) / global_b


def prototype_loss(proj_image, proj_text, proto_scale, *, image_centroids, text_centroids,
                   image_assign, text_assign, image_centroids_from_text,
                   text_centroids_from_image, teacher_temperature=0.01, axis_name=None):
  """ProtoCLIP's cross-modal prototype loss ``½ (L_i2t + L_t2i)`` over the global batch.

  Without back translation pass ``image_centroids_from_text=text_centroids`` and
  ``text_centroids_from_image=image_centroids``.

  Args:
    proj_image: ``[b, d_p]`` projected image features ``g_I(x)`` (local rows; L2-normalised
      here, in float32).
    proj_text: ``[b, d_p]`` projected text features ``g_T(y)``, paired row by row.
    proto_scale: scalar ``s_p = exp(θ_p)`` (the scale itself).
    image_centroids: ``[K, d_p]`` k-means centroids ``C^I`` of the image projections.
    text_centroids: ``[K, d_p]`` centroids ``C^T`` of the text projections.
    image_assign: int ``[b]`` image cluster ``y^I`` of each local sample.
    text_assign: int ``[b]`` text cluster ``y^T`` of each local sample.
    image_centroids_from_text: ``[K, d_p]`` ``C^{I←T}`` (text clusters in image space).
    text_centroids_from_image: ``[K, d_p]`` ``C^{T←I}``.
    teacher_temperature: ``τ_t`` of the soft targets (≤ 0: one-hot).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: float32 global-batch loss, the same on every device; centroids and
    targets are constants (stop-gradient), gradients reach ``proj_*`` and ``proto_scale``.
    ``metrics``: ``proto_i2t_loss``, ``proto_t2i_loss`` and ``proto_i2t_acc`` /
    ``proto_t2i_acc`` (the student's top class equals the teacher's cluster).
  """
  logits_i = _student_logits(proj_image, proto_scale, image_centroids_from_text)
  logits_t = _student_logits(proj_text, proto_scale, text_centroids_from_image)
  target_i = soft_targets(text_centroids, text_assign, teacher_temperature)
  target_t = soft_targets(image_centroids, image_assign, teacher_temperature)
  xent_i = _cross_entropy(logits_i, target_i)
  xent_t = _cross_entropy(logits_t, target_t)
  loss = _global_mean(0.5 * (xent_i + xent_t), axis_name)
  hit = lambda logits, y: (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  metrics = {
      "proto_i2t_loss": _global_mean(xent_i, axis_name),
      "proto_t2i_loss": _global_mean(xent_t, axis_name),
      "proto_i2t_acc": _global_mean(hit(logits_i, text_assign), axis_name),
      "proto_t2i_acc": _global_mean(hit(logits_t, image_assign), axis_name),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def external_teacher_loss(proj_image, proj_text, proto_scale, *, teacher_assign,
                          image_centroids_from_teacher, text_centroids_from_teacher,
                          axis_name=None):
  """ProtoCLIP's external-teacher term with hard targets over the global batch:

  ``L_ext = ½ [ CE(s_p p^I C^{I←E}ᵀ, y^E) + CE(s_p p^T C^{T←E}ᵀ, y^E) ]``.

  Args:
    proj_image: ``[b, d_p]`` projected image features (local rows; normalised here).
    proj_text: ``[b, d_p]`` projected text features.
    proto_scale: scalar ``s_p``.
    teacher_assign: int ``[b]`` cluster ``y^E`` of each sample in the teacher's k-means.
    image_centroids_from_teacher: ``[K_e, d_p]`` ``C^{I←E}`` (teacher clusters averaged in
      image-projection space, :func:`back_translate`).
    text_centroids_from_teacher: ``[K_e, d_p]`` ``C^{T←E}``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)`` with ``ext_i_acc`` / ``ext_t_acc`` (top class equals ``y^E``).
  """
  logits_i = _student_logits(proj_image, proto_scale, image_centroids_from_teacher)
  logits_t = _student_logits(proj_text, proto_scale, text_centroids_from_teacher)
  target = jax.nn.one_hot(teacher_assign, logits_i.shape[-1], dtype=jnp.float32)
  xent = 0.5 * (_cross_entropy(logits_i, target) + _cross_entropy(logits_t, target))
  hit = lambda logits: (jnp.argmax(logits, axis=-1) == teacher_assign).astype(jnp.float32)
  metrics = {"ext_i_acc": _global_mean(hit(logits_i), axis_name),
             "ext_t_acc": _global_mean(hit(logits_t), axis_name)}
  return _global_mean(xent, axis_name), jax.tree.map(jax.lax.stop_gradient, metrics)

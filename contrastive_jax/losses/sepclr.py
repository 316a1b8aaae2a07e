"""SepCLR: separating common from salient patterns (Louiset et al., ICLR 2024), METHODS.md §2.6.

Contrastive analysis: a *background* dataset (e.g. healthy subjects) and a *target* dataset
(e.g. patients). Two encoders give, for two views of every sample, *common* embeddings ``c``
(hyperspherical) and *salient* embeddings ``s`` (Euclidean, not normalised). The loss is

  ``L = L_common + w_s·L_salient + w_bg·L_background + w_ind·L_independence``

* ``L_common``: NT-Xent (:func:`~contrastive_jax.losses.simclr.nt_xent_loss`) on ``c`` over
  background *and* target samples (maximises ``I(x; c)`` and ``I(y; c)``).
* ``L_salient`` (target samples only, maximises ``I(y; s)``): Euclidean alignment
  ``mean ‖s¹_i − s²_i‖²`` + uniformity ``log mean_{i≠j} exp(−t‖s_i − s_j‖²)`` + repulsion
  from the null vector ``log mean_i exp(−t‖s_i − s'‖²)``, ``s' = 0``, over the ``2N_T``
  salient embeddings of both views.
* ``L_background``: ``mean ‖s_i − s'‖²`` over the background samples' salient embeddings
  (both views): the information-less null vector.
* ``L_independence`` (``I(c; s) = 0`` on targets): minus a Gaussian-KDE estimate of the joint
  entropy ``H(c, s)``, ``mean_i log mean_j exp(−‖u_i − u_j‖² / (2h²))`` with
  ``u = [ĉ, s]`` over the target samples' first views (``j`` includes ``i``), as the paper's
  kernel joint-entropy maximisation.

Choices ([unverified]: the terms follow the paper's description; the exact estimators and
weights were not checked against the code): InfoNCE for the common space, Wang & Isola forms
for the salient space, ``s' = 0``, the KDE bandwidth ``h`` a hyperparameter, no constant
terms of the entropy estimate. Properties: without target samples the salient embeddings get
only the background term's gradient; with only target samples ``L_common`` is NT-Xent on ``c``.

Distributed form: every pairwise term is pattern L (local rows against all-gathered columns
with gradient), so value and gradients equal the single-device ones on the concatenated batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, geometry
from contrastive_jax.losses.simclr import nt_xent_loss


def _masked_mean(values, valid, axis_name):
  """Global mean of ``values [b]`` over rows with ``valid``; 0 when none."""
  total = common.global_sum(jnp.sum(jnp.where(valid, values, 0.0)), axis_name)
  count = common.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _null_repulsion(s, valid, t, axis_name):
  """``log mean_{i valid} exp(−t ‖s_i‖²)`` (0 when no row is valid)."""
  return geometry.global_log_mean_exp(-t * jnp.sum(s * s, axis=-1), valid, axis_name=axis_name)


def kde_log_density(u, valid, *, bandwidth, axis_name=None):
  """``mean_{i valid} log mean_{j valid} exp(−‖u_i − u_j‖² / (2h²))`` (``j`` includes ``i``):
  minus the Gaussian-KDE entropy estimate of the valid rows of ``u [b, D]`` (0 if none)."""
  cols = common.all_gather_rows(u, axis_name)
  col_valid = common.all_gather_rows(valid, axis_name)
  logits = -geometry.squared_distances(u, cols) / (2.0 * bandwidth ** 2)
  logits = jnp.where(col_valid[None, :], logits, -1e30)
  per_row = (jax.nn.logsumexp(logits, axis=1)
             - jnp.log(jnp.maximum(common.global_sum(jnp.sum(valid.astype(jnp.float32)),
                                                     axis_name), 1.0)))
  return _masked_mean(per_row, valid, axis_name)


def sepclr_loss(c1, c2, s1, s2, is_target, *, temperature=0.1, t=2.0, bandwidth=1.0,
                salient_weight=1.0, background_weight=1.0, independence_weight=1.0,
                axis_name=None):
  """SepCLR's loss over the global batch (see the module docstring).

  Args:
    c1: ``[b, Dc]`` common embeddings of the first view (normalised inside), any float dtype;
      local shard when ``axis_name`` is given.
    c2: ``[b, Dc]`` common embeddings of the second view.
    s1: ``[b, Ds]`` salient embeddings of the first view (Euclidean: not normalised).
    s2: ``[b, Ds]`` salient embeddings of the second view.
    is_target: bool ``[b]``, True for target-dataset samples, False for background ones.
    temperature: ``τ`` of the common-space NT-Xent.
    t: scale of the salient uniformity / null-repulsion kernels.
    bandwidth: ``h`` of the joint-entropy KDE.
    salient_weight, background_weight, independence_weight: ``w_s``, ``w_bg``, ``w_ind``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 global loss, identical on every device; ``metrics``
    holds the four terms (``common``, ``salient``, ``background``, ``independence``),
    ``salient_alignment``, ``salient_uniformity`` and ``target_fraction``.
  """
  s1, s2 = s1.astype(jnp.float32), s2.astype(jnp.float32)
  is_target = is_target.astype(bool)
  common_loss, common_metrics = nt_xent_loss(c1, c2, temperature, axis_name=axis_name)

  align = _masked_mean(jnp.sum((s1 - s2) ** 2, axis=-1), is_target, axis_name)
  both = jnp.concatenate([s1, s2])
  both_target = jnp.concatenate([is_target, is_target])
  # Rows of ``both`` are [s1; s2]: the all-gather orders columns per device, and the pair
  # set is symmetric, so the global mean over distinct valid pairs is unchanged.
  unif = geometry.log_mean_gaussian(both, t=t, valid=both_target, normalize=False,
                                    axis_name=axis_name)
  repel = _null_repulsion(both, both_target, t, axis_name)
  salient = align + unif + repel

  background = _masked_mean(jnp.sum(both * both, axis=-1), ~both_target, axis_name)
  joint = jnp.concatenate([common.l2_normalize(c1), s1], axis=-1)
  independence = kde_log_density(joint, is_target, bandwidth=bandwidth, axis_name=axis_name)

  loss = (common_loss + salient_weight * salient + background_weight * background
          + independence_weight * independence)
  metrics = {
      "common": common_loss, "salient": salient, "background": background,
      "independence": independence, "salient_alignment": align,
      "salient_uniformity": unif, "common_acc": common_metrics["acc"],
      "target_fraction": _masked_mean(is_target.astype(jnp.float32),
                                      jnp.ones_like(is_target), axis_name),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

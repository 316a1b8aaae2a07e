"""DCL and DCLW, the decoupled contrastive loss (Yeh et al., ECCV 2022), METHODS.md §1.8.

SimCLR's two-view set-up (§1.7) with the positive removed from the denominator: anchor
``ĥ¹_i`` has positive ``ĥ²_i`` and the ``2B − 2`` other embeddings of both views as negatives,

  ``ℓ¹_i = −w_i · ĥ¹_i·ĥ²_i/τ + LSE_{j≠i}[ĥ¹_i·ĥ¹_j/τ, ĥ¹_i·ĥ²_j/τ]``

and ``ℓ²_i`` alike with the views swapped (same ``w_i``: the positive similarity is symmetric).
DCL has ``w_i = 1``; DCLW uses the von Mises-Fisher weights
``w_i = 2 − B · softmax_k(ĥ¹_k·ĥ²_k / σ)_i`` normalised over the *global* batch (lightly
normalises per device; we keep single-device semantics). The weights are importance
coefficients under stop-gradient by default (lightly); ``stop_gradient_weights=False``
differentiates through them (raminnakhli). The loss is the mean over the ``2B`` anchors
(lightly's convention, half of raminnakhli's sum of directions); it can be negative.

Distributed form (pattern L): the ``2b`` local anchors are scored against both views
all-gathered with gradient; the self and positive columns are masked at *global* indices;
the softmax normaliser of the DCLW weights is ``psum``'d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses import simclr

_MASKED = simclr._MASKED  # pylint: disable=protected-access


def vmf_weights(pos_sim, sigma=0.5, *, axis_name=None):
  """DCLW weights ``w_i = 2 − B · softmax_k(s_k / σ)_i`` over the global batch (differentiable).

  Args:
    pos_sim: float ``[b]`` positive cosine similarities ``ĥ¹_i·ĥ²_i`` (local shard when
      ``axis_name`` is set).
    sigma: ``σ`` (paper: 0.5).
    axis_name: mapped data axis, or None.

  Returns:
    float32 ``[b]`` weights; over the global batch they sum to ``B`` (mean 1), lie in
    ``(2 − B, 2)`` and are all 1 when the positive similarities are all equal.
  """
  s = pos_sim.astype(jnp.float32) / sigma
  shift = jax.lax.stop_gradient(jnp.max(s))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  e = jnp.exp(s - shift)
  global_b = s.shape[0] * (1 if axis_name is None else jax.lax.axis_size(axis_name))
  return 2.0 - global_b * e / common.global_sum(jnp.sum(e), axis_name)


def dcl_logits(z1, z2, temperature, *, axis_name=None):
  """Logits of the ``2b`` local anchors against the ``2B`` global candidates, self masked.

  Args:
    z1: ``[b, D]`` first-view embeddings (local shard when ``axis_name`` is set).
    z2: ``[b, D]`` second-view embeddings, paired row by row with ``z1``.
    temperature: ``τ``.
    axis_name: mapped data axis, or None.

  Returns:
    ``(logits, pos, neg_mask)``: float32 ``[2b, 2B]`` logits with each anchor's own column
    masked (rows ``[z1 anchors; z2 anchors]``, columns ``[all z1; all z2]``), float32 ``[2b]``
    positive logits, bool ``[2b, 2B]`` true at the ``2B − 2`` negatives of each anchor.
  """
  logits, positives = simclr.nt_xent_logits(z1, z2, temperature, axis_name=axis_name)
  cols = jnp.arange(logits.shape[1])[None, :]
  pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  neg_mask = (cols != positives[:, None]) & (logits > _MASKED / 2)
  return logits, pos, neg_mask


def dcl_anchor_losses(z1, z2, temperature=0.1, *, sigma=None, stop_gradient_weights=True,
                      axis_name=None):
  """Per-anchor DCL/DCLW terms ``[ℓ¹; ℓ²]`` of the local rows, and the weights.

  Args: as ``dcl_loss``.

  Returns:
    ``(terms, logits, pos, neg_mask, weights)``: float32 ``[2b]`` terms (first the ``z1``
    anchors, then the ``z2`` anchors), the outputs of ``dcl_logits``, and float32 ``[b]``
    weights (ones for DCL; ``sg`` applied when ``stop_gradient_weights``).
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  logits, pos, neg_mask = dcl_logits(z1, z2, temperature, axis_name=axis_name)
  b = z1.shape[0]
  if sigma is None:
    weights = jnp.ones((b,), jnp.float32)
  else:
    weights = vmf_weights(pos[:b] * temperature, sigma, axis_name=axis_name)
    if stop_gradient_weights:
      weights = jax.lax.stop_gradient(weights)
  neg_lse = jax.nn.logsumexp(jnp.where(neg_mask, logits, _MASKED), axis=1)
  terms = neg_lse - jnp.concatenate([weights, weights]) * pos
  return terms, logits, pos, neg_mask, weights


def dcl_loss(z1, z2, temperature=0.1, *, sigma=None, stop_gradient_weights=True,
             axis_name=None):
  """Decoupled contrastive loss over the global batch: mean over the ``2B`` anchors.

  Args:
    z1: ``[b, D]`` projection-head outputs of the first view, any float dtype; the local shard
      when ``axis_name`` is given. Normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` (paper: 0.1), static.
    sigma: None for DCL; ``σ`` of the DCLW von Mises-Fisher weights (paper: 0.5).
    stop_gradient_weights: DCLW weights as constants (spec, lightly) or differentiable.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. the local inputs equals the single-device gradient on the concatenated
    batch (needs a global batch ``B ≥ 2``); ``metrics`` holds ``acc`` (fraction of anchors
    whose positive beats all negatives), ``pos_logit`` / ``neg_logit`` (mean positive /
    negative logit) and, for DCLW, ``weight_min`` / ``weight_max`` over the global batch.
  """
  terms, logits, pos, neg_mask, weights = dcl_anchor_losses(
      z1, z2, temperature, sigma=sigma, stop_gradient_weights=stop_gradient_weights,
      axis_name=axis_name)
  two_b = logits.shape[1]
  loss = common.global_sum(jnp.sum(terms), axis_name) / two_b

  neg_max = jnp.max(jnp.where(neg_mask, logits, _MASKED), axis=1)
  hit = (pos > neg_max).astype(jnp.float32)
  neg_sum = jnp.sum(jnp.where(neg_mask, logits, 0.0))
  num_neg = float(two_b) * (two_b - 2)  # float: B² overflows int32
  metrics = {
      "acc": common.global_sum(jnp.sum(hit), axis_name) / two_b,
      "pos_logit": common.global_sum(jnp.sum(pos), axis_name) / two_b,
      "neg_logit": (common.global_sum(neg_sum, axis_name) / num_neg) if num_neg else 0.0,
  }
  if sigma is not None:
    w = jax.lax.stop_gradient(weights)
    w_min, w_max = jnp.min(w), jnp.max(w)
    if axis_name is not None:
      w_min, w_max = jax.lax.pmin(w_min, axis_name), jax.lax.pmax(w_max, axis_name)
    metrics["weight_min"], metrics["weight_max"] = w_min, w_max
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

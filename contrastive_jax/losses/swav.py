"""SwAV swapped prediction with online Sinkhorn-Knopp codes (Caron et al., 2020), METHODS §1.6.

``sinkhorn`` computes the equipartitioned soft codes of one assignment crop; ``swav_loss``
predicts the codes of each assignment crop from the scores of every other crop.

Sinkhorn runs in the log domain (no ``exp(score/ε)`` overflow, even in small ``ε``) and in
float32 under stop-gradient. Distributed form (pattern S): the total mass and the ``K``
per-prototype masses are log-sum-exp'd across devices (a ``pmax`` for the shift and a ``psum``
of the shifted sums); the per-sample normalisation is local. No embeddings are gathered; the
loss is the ``psum`` of local sums divided by the global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _global_logsumexp(x, axis, axis_name):
  """``log Σ exp(x)`` over ``axis`` (None: all entries) of the rows of every device, keepdims.

  Only the row axis (0) and the whole array are split over devices; reduce over those only.
  """
  shift = jnp.max(x, axis=axis, keepdims=True)
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  total = common.global_sum(jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True), axis_name)
  return jnp.log(total) + shift


def sinkhorn(scores, epsilon=0.05, iterations=3, *, axis_name=None):
  """Sinkhorn-Knopp codes of METHODS §1.6, in the log domain, over the global batch.

  With ``Q = exp(S/ε)`` (samples × prototypes here): divide by the total mass; then
  ``iterations`` times give each prototype mass ``1/K`` (sums over all devices' rows) and each
  sample mass ``1/N_tot`` (local); finally scale by ``N_tot`` so each code row sums to 1.

  Args:
    scores: float ``[b, K]`` scores ``z·Cᵀ`` of the local rows (any float dtype; the rows of
      every device when ``axis_name`` is given, ``N_tot = W·b``). Queue rows, if any, are
      simply more rows: prepend them and keep the batch's rows of the result.
    epsilon: ``ε`` (SwAV: 0.05), > 0.
    iterations: number of Sinkhorn iterations (SwAV: 3), static, ≥ 1.
    axis_name: mapped data axis, or None.

  Returns:
    float32 ``[b, K]`` codes under stop-gradient; every row sums to 1 and, as ``iterations``
    grows, every prototype column sums to ``N_tot / K`` over the global batch. Equal to the
    single-device result on the concatenated scores.
  """
  if epsilon <= 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}.")
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}.")
  b, k = scores.shape
  log_n_tot = math.log(b * _num_shards(axis_name))
  log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  log_q = log_q - _global_logsumexp(log_q, None, axis_name)

  def step(_, log_q):
    log_q = log_q - _global_logsumexp(log_q, 0, axis_name) - math.log(k)
    return log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - log_n_tot

  log_q = jax.lax.fori_loop(0, iterations, step, log_q)
  # N_tot·Q after a per-sample normalisation; the softmax makes the row sums 1 to rounding.
  return jax.lax.stop_gradient(jax.nn.softmax(log_q, axis=1))


def swav_loss(scores, *, num_assign_crops=2, temperature=0.1, epsilon=0.05,
              sinkhorn_iterations=3, axis_name=None):
  """Swapped-prediction loss over the global batch.

  ``L = (1/|A|) Σ_{a<|A|} (1/(V−1)) Σ_{v≠a} (1/B) Σ_i CE(q_a[i], softmax(p_v[i]/τ))`` with
  ``q_a = sinkhorn(p_a)`` per assignment crop.

  Args:
    scores: float ``[V, b, K]`` scores ``p_v = z_v·Cᵀ`` (unit embeddings, unit prototypes) of
      the ``V`` crops (local shard of the batch when ``axis_name`` is given); any float dtype,
      computed in float32.
    num_assign_crops: ``|A|``: crops ``0 .. |A|−1`` give codes (SwAV: 2), static.
    temperature: ``τ`` of the predictions (SwAV: 0.1).
    epsilon: Sinkhorn ``ε``.
    sinkhorn_iterations: Sinkhorn iterations.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. the local scores equals the single-device gradient on the concatenated
    batch (codes are constants; gradient flows through the predictions of every crop).
    ``metrics`` (over assignment crops and the global batch): ``code_entropy`` (mean entropy
    of the code rows, nats), ``code_max`` (mean largest code probability) and
    ``prototype_perplexity`` (``exp`` of the entropy of the fraction of rows whose argmax
    code is each prototype: the effective number of prototypes used, at most ``K``).
  """
  num_crops, b, k = scores.shape
  if num_crops < 2:
    raise ValueError(f"SwAV needs at least 2 crops, got {num_crops}.")
  if not 1 <= num_assign_crops <= num_crops:
    raise ValueError(f"num_assign_crops must be in [1, {num_crops}], got {num_assign_crops}.")
  scores = scores.astype(jnp.float32)
  log_p = jax.nn.log_softmax(scores / temperature, axis=-1)  # [V, b, K]
  codes = jnp.stack([
      sinkhorn(scores[a], epsilon, sinkhorn_iterations, axis_name=axis_name)
      for a in range(num_assign_crops)])  # [|A|, b, K]

  total = jnp.zeros((), jnp.float32)
  for a in range(num_assign_crops):
    ce = -jnp.sum(codes[a][None] * log_p, axis=-1)  # [V, b]
    total = total + jnp.sum(ce) - jnp.sum(ce[a])
  global_b = b * _num_shards(axis_name)
  loss = common.global_sum(total, axis_name) / (global_b * num_assign_crops * (num_crops - 1))

  rows = global_b * num_assign_crops
  entropy = -jnp.sum(jax.scipy.special.xlogy(codes, codes))
  usage = jnp.sum(jax.nn.one_hot(jnp.argmax(codes, axis=-1), k, dtype=jnp.float32), axis=(0, 1))
  usage = common.global_sum(usage, axis_name) / rows
  metrics = {
      "code_entropy": common.global_sum(entropy, axis_name) / rows,
      "code_max": common.global_sum(jnp.sum(jnp.max(codes, axis=-1)), axis_name) / rows,
      "prototype_perplexity": jnp.exp(-jnp.sum(jax.scipy.special.xlogy(usage, usage))),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

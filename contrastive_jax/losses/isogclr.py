"""iSogCLR: robust global contrastive loss with individualised temperatures (METHODS.md §1.11).

Qiu et al. (ICML 2023) minimise, per anchor ``i`` with its own temperature ``τ_i``, the
DRO-regularised global contrastive objective

  ``F_i = τ_i log( (1/|S_i⁻|) Σ_{j∈S_i⁻} exp(d_ij / τ_i) ) + τ_i ρ``,  ``τ_i ∈ [τ_min, τ_max]``,

with ``d_ij = s(anchor_i, cand_j) − s(anchor_i, positive_i)`` (cosine similarities) and the inner
mean over the whole dataset estimated by per-sample moving averages. Per step, for every
anchor of the global batch (all under stop-gradient except ``d`` in the surrogate)::

  e_ij = d_ij / τ_i
  b_i ← max(b_i, max_j e_ij)                               running max (overflow guard)
  g_i = (1/n) Σ_j exp(e_ij − b_i)                          n = |S_i⁻| in the batch
  u_i ← (1−γ) u_i exp(b_i_old − b_i) + γ g_i               rescaled moving average
  w_ij = exp(e_ij − b_i) / (u_i + 1e-10)
  surrogate_i = (1/n) Σ_j w_ij d_ij                         (its gradient is the estimator)
  G_i = log u_i + b_i + ρ − (1/n) Σ_j w_ij e_ij             ∂F_i/∂τ_i estimate
  m_i ← (1−β_u) m_i + β_u clip(G_i, −5, 5)
  τ_i ← clip(τ_i − η m_i, τ_min, τ_max)

Anchor sets: column 0 of the state holds the anchors of ``z1`` (images), column 1 those of
``z2`` (texts).

* Bimodal (image–text): anchor ``z1_i`` contrasts with ``z2_j`` (``j ≠ i``; rows of
  ``S = ẑ1 ẑ2ᵀ``, ``d_ij = S_ij − S_ii``); anchor ``z2_i`` with ``z1_j`` (columns,
  ``d_ij = S_ji − S_ii``). ``n = B − 1``.
* Unimodal (two views): anchor ``z1_i`` (or ``z2_i``) contrasts with every row of both views
  except itself and its positive, ``d = s(anchor, cand) − s(anchor, positive)``,
  ``n = 2B − 2`` (the unimodal reference's mask). Each view keeps its own state column.

``include_self=True`` reproduces the bimodal reference code's quirk: the positive's own term
(``d = 0``, contributing ``e^{−b_i}``) enters the running max and the sums while ``n`` stays
``B − 1``; in the unimodal variant the flag likewise adds the positive's term (``n = 2B − 2``).

State (``init_state``): ``u = 0`` (the reference's zeros; no first-step special case), ``b = 0``
(the reference's zeros: ``b`` is a running max floored at 0), ``τ = τ_init``, ``m = 0``.
Dataset ids must be distinct within one global batch (a duplicate id's state row receives
one of its writes, unspecified which).

Distribution (pattern L + replicated state): both views are gathered *with* gradient, each
device scores its local anchors (``[b, B]`` or ``[b, 2B]``); the loss is ``psum`` of local
sums over ``B`` (exact gradients). New state rows of the local anchors are gathered with
their ids as device-invariant values and scattered into the ``[N, 2]`` arrays, so every
device returns the identical state. Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.kmeans import gather_rows_invariant

_MASKED = -1e9  # finite stand-in for −inf in the running max
_W_EPS = 1e-10  # the reference's eps in the weights' denominator
_GRAD_CLIP = 5.0  # the reference's clip of the temperature gradient
STATE_FIELDS = ("u", "b", "tau", "m")


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def init_state(num_examples, *, tau_init=0.01):
  """Per-sample state of a dataset of ``num_examples`` items.

  Args:
    num_examples: ``N``, the dataset size (ids are ``0 … N−1``).
    tau_init: initial temperature (reference script: 0.01).

  Returns:
    ``{"u", "b", "tau", "m"}``, each float32 ``[N, 2]`` (column 0: anchors of ``z1`` /
    images, column 1: anchors of ``z2`` / texts): ``u = b = m = 0``, ``tau = tau_init``.
  """
  zeros = jnp.zeros((num_examples, 2), jnp.float32)
  return {"u": zeros, "b": zeros, "tau": jnp.full((num_examples, 2), tau_init, jnp.float32),
          "m": zeros}


def differences(z1, z2, *, bimodal=False, include_self=False, axis_name=None):
  """Differences ``d`` of the local anchors of both sets against their candidates.

  Args:
    z1: ``[b, D]`` first view / images (local rows), normalised inside in float32.
    z2: ``[b, D]`` second view / texts, paired row by row with ``z1``.
    bimodal: image–text candidates (other modality) instead of both views.
    include_self: keep the positive's own term (``d = 0``) among the candidates.
    axis_name: mapped data axis, or None.

  Returns:
    ``(d, valid, num_neg)``: float32 ``[2, b, M]`` (set 0: anchors ``z1``, set 1: ``z2``;
    ``M = B`` bimodal, ``2B`` unimodal; gradient flows through every entry), bool ``[2, b, M]``
    marking the candidates that enter the sums, and the int divisor ``n`` (``B − 1`` or
    ``2B − 2``).
  """
  a1, a2 = common.l2_normalize(z1), common.l2_normalize(z2)
  b = a1.shape[0]
  c1, c2 = common.all_gather_rows(a1, axis_name), common.all_gather_rows(a2, axis_name)
  global_b = c1.shape[0]
  if global_b < 2:
    raise ValueError(f"iSogCLR needs a global batch of at least 2; got {global_b}.")
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  if bimodal:
    sims = jnp.stack([a1 @ c2.T, a2 @ c1.T])  # [2, b, B]
    pos_col = jnp.stack([rows, rows])
    self_col = None
    num_neg = global_b - 1
  else:
    cands = jnp.concatenate([c1, c2], axis=0)
    sims = jnp.stack([a1 @ cands.T, a2 @ cands.T])  # [2, b, 2B]
    pos_col = jnp.stack([rows + global_b, rows])
    self_col = jnp.stack([rows, rows + global_b])
    num_neg = 2 * global_b - 2
  pos = jnp.take_along_axis(sims, pos_col[:, :, None], axis=2)
  d = sims - pos
  cols = jnp.arange(sims.shape[2])[None, None, :]
  valid = jnp.ones(sims.shape, bool)
  if not include_self:
    valid &= cols != pos_col[:, :, None]
  if self_col is not None:
    valid &= cols != self_col[:, :, None]
  return d, valid, num_neg


def isogclr_loss(z1, z2, index, state, *, bimodal=False, gamma=0.8, rho=6.0, eta=0.03,
                 beta_u=0.9, tau_min=0.005, tau_max=1.0, include_self=False, axis_name=None):
  """iSogCLR surrogate loss and per-sample state update for one (global) batch.

  Args:
    z1: ``[b, D]`` first view / image embeddings (local rows; any float dtype).
    z2: ``[b, D]`` second view / text embeddings, paired row by row with ``z1``.
    index: int ``[b]`` dataset ids of the local rows (distinct over the global batch).
    state: ``{"u", "b", "tau", "m"}`` float32 ``[N, 2]``, replicated (``init_state``).
    bimodal: image–text variant (else the unimodal two-view variant).
    gamma: ``γ``, moving-average rate of ``u`` (0.8).
    rho: ``ρ``, DRO radius (script: 6.0).
    eta: ``η``, temperature step size (script: 0.03).
    beta_u: ``β_u``, momentum rate of the temperature gradient (0.9).
    tau_min: lower temperature bound (0.005).
    tau_max: upper temperature bound (1.0).
    include_self: reference-code parity flag (see the module docstring).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, (metrics, new_state))``. ``loss``: float32, the sum over both anchor sets of the
    global-batch mean surrogate (identical on every device; gradient exact w.r.t. the local
    rows); its *value* is not the objective. ``metrics``: ``objective_1``/``objective_2`` (mean
    of ``τ_i (log u_i + b_i)``, the estimate of ``τ_i log mean_j exp(d_ij/τ_i)``, per anchor
    set), ``tau_mean``, ``tau_min``, ``tau_max`` (temperatures used in this step, both sets).
    ``new_state``: like ``state``, with the rows of the batch's ids updated, device-invariant.
  """
  d, valid, num_neg = differences(z1, z2, bimodal=bimodal, include_self=include_self,
                                  axis_name=axis_name)
  index = jnp.asarray(index, jnp.int32)
  state = jax.lax.stop_gradient(state)
  old = {k: state[k][index].T for k in STATE_FIELDS}  # each [2, b]
  tau = old["tau"]
  e = jax.lax.stop_gradient(d) / tau[:, :, None]
  e_valid = jnp.where(valid, e, _MASKED)
  b_new = jnp.maximum(old["b"], jnp.max(e_valid, axis=2))
  ex = jnp.where(valid, jnp.exp(e_valid - b_new[:, :, None]), 0.0)
  g = jnp.sum(ex, axis=2) / num_neg
  u_new = (1.0 - gamma) * old["u"] * jnp.exp(old["b"] - b_new) + gamma * g
  w = ex / (u_new[:, :, None] + _W_EPS)
  surrogate = jnp.sum(w * jnp.where(valid, d, 0.0), axis=2) / num_neg  # [2, b]
  global_b = z1.shape[0] * _num_shards(axis_name)
  loss = common.global_sum(jnp.sum(surrogate), axis_name) / global_b

  log_u = jnp.log(jnp.maximum(u_new, jnp.finfo(jnp.float32).tiny))
  grad_tau = log_u + b_new + rho - jnp.sum(w * jnp.where(valid, e, 0.0), axis=2) / num_neg
  m_new = (1.0 - beta_u) * old["m"] + beta_u * jnp.clip(grad_tau, -_GRAD_CLIP, _GRAD_CLIP)
  tau_new = jnp.clip(tau - eta * m_new, tau_min, tau_max)

  ids = gather_rows_invariant(index, axis_name)
  new_state = {}
  for name, rows in (("u", u_new), ("b", b_new), ("tau", tau_new), ("m", m_new)):
    rows = gather_rows_invariant(rows.T.astype(state[name].dtype), axis_name)  # [B, 2]
    new_state[name] = state[name].at[ids].set(rows)

  objective = common.global_sum(jnp.sum(tau * (log_u + b_new), axis=1), axis_name) / global_b
  tau_lo, tau_hi = jnp.min(tau), jnp.max(tau)
  if axis_name is not None:
    tau_lo, tau_hi = jax.lax.pmin(tau_lo, axis_name), jax.lax.pmax(tau_hi, axis_name)
  metrics = {
      "objective_1": objective[0],
      "objective_2": objective[1],
      "tau_mean": common.global_sum(jnp.sum(tau), axis_name) / (2 * global_b),
      "tau_min": tau_lo,
      "tau_max": tau_hi,
  }
  return loss, (jax.tree.map(jax.lax.stop_gradient, metrics), new_state)

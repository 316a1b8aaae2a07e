"""MoCo-v2 queue loss and MoCHi hard-negative mixing (METHODS.md §1.9, pattern Q of §0.4).

MoCo-v2: queries ``q = f_q(x¹)`` against their keys ``k = sg(f_k(x²))`` from the momentum
encoder and a FIFO queue of past keys; logits ``[q̂·k̂, q̂·Q̂ᵀ] / τ`` with target 0:

  ``ℓ_i = −log exp(q̂_i·k̂_i/τ) / (exp(q̂_i·k̂_i/τ) + Σ_n exp(q̂_i·Q̂_n/τ))``

MoCHi (Kalantidis et al., 2020) appends, per query, synthetic negatives built under
stop-gradient from its ``N`` hardest queue entries (top-N by ``q̂·Q̂``):

* type 1 (``s`` per query): ``h = normalize(α n_a + (1 − α) n_b)``, ``α ~ U(0, 1)``;
* type 2 (``s'`` per query): ``h' = normalize(β q̂ + (1 − β) n_c)``, ``β ~ U(0, 0.5)``;

with ``n_a, n_b, n_c`` drawn uniformly from the hard set. Synthetic negatives are never
enqueued. Every draw is keyed by ``fold_in(rng, global row index)``, so 1- and 8-device runs
draw the same negatives for the same query.

Distribution: queries and keys are local rows (the loss is ``psum`` of local sums over the
global ``B``, so gradients are exact), the queue is replicated; ``enqueue`` gathers the keys
of all devices in global row order as a device-invariant value, so every device writes the
identical queue. Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses.kmeans import gather_rows_invariant


def _num_shards(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def init_queue(size, dim, rng):
  """A queue of ``size`` random unit keys, write pointer at 0.

  Args:
    size: ``K_q``, the number of stored keys.
    dim: ``D``, the key dimension.
    rng: PRNG key.

  Returns:
    ``{"keys": float32 [size, dim] unit rows (normalised standard normal), "ptr": int32 []}``.
  """
  keys = common.l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
  return {"keys": keys, "ptr": jnp.zeros((), jnp.int32)}


def enqueue(queue, keys, *, axis_name=None):
  """Writes the global batch of keys FIFO at the queue pointer (no gradient).

  Args:
    queue: ``{"keys": [K_q, D], "ptr": int32 []}``, replicated over devices.
    keys: ``[b, D]`` this device's keys (any float dtype); the global batch is their
      concatenation over devices in device order (``B = W · b`` rows).
    axis_name: mapped data axis, or None.

  Returns:
    The new queue: the ``B`` normalised keys written at rows ``(ptr + i) mod K_q`` (wrapping
    around; ``K_q`` need not be a multiple of ``B``) and ``ptr`` advanced to ``(ptr + B) mod
    K_q``. Device-invariant: every device holds the identical queue (it may be returned with
    ``out_specs=P()`` from ``shard_map``).

  Raises:
    ValueError: if the global batch is larger than the queue.
  """
  size = queue["keys"].shape[0]
  global_b = keys.shape[0] * _num_shards(axis_name)
  if global_b > size:
    raise ValueError(f"MoCo queue of {size} keys cannot take a global batch of {global_b} keys.")
  new = gather_rows_invariant(common.l2_normalize(keys), axis_name)
  ptr = jnp.asarray(queue["ptr"], jnp.int32)
  rows = (ptr + jnp.arange(global_b, dtype=jnp.int32)) % size
  stored = jnp.asarray(queue["keys"])
  stored = stored.at[rows].set(new.astype(stored.dtype))
  return {"keys": stored, "ptr": ((ptr + global_b) % size).astype(jnp.int32)}


def _top_k(qn, kn, num_hard):
  if not 1 <= num_hard <= kn.shape[0]:
    raise ValueError(f"num_hard={num_hard} must be in [1, {kn.shape[0]}] (the queue size).")
  return jax.lax.top_k(jax.lax.stop_gradient(qn @ kn.T), num_hard)[1]


def hard_negative_indices(q, queue_keys, num_hard):
  """Indices ``[b, num_hard]`` of each query's most similar queue rows (descending; no grad)."""
  qn = jax.lax.stop_gradient(common.l2_normalize(q))
  return _top_k(qn, jax.lax.stop_gradient(common.l2_normalize(queue_keys)), num_hard)


def mix_hard_negatives(q, queue_keys, rng, *, num_hard, num_mix, num_query_mix, row_offset=0):
  """MoCHi's synthetic negatives for each query (all under stop-gradient).

  Args:
    q: ``[b, D]`` queries (normalised inside, float32).
    queue_keys: ``[K_q, D]`` queue (normalised inside).
    rng: PRNG key, the same on every device; row ``r`` draws with ``fold_in(rng, r)``.
    num_hard: ``N``, size of each query's hard set (top-N queue rows by similarity).
    num_mix: ``s``, type-1 negatives (mixtures of two hard negatives) per query.
    num_query_mix: ``s'``, type-2 negatives (query mixed into one hard negative) per query.
    row_offset: global index of the first local row (``common.shard_offset``), an int or
      int32 scalar.

  Returns:
    float32 ``[b, s + s', D]`` unit rows: the ``s`` type-1 negatives, then the ``s'`` type-2.
  """
  qn = jax.lax.stop_gradient(common.l2_normalize(q))
  kn = jax.lax.stop_gradient(common.l2_normalize(queue_keys))
  hard = kn[_top_k(qn, kn, num_hard)]  # [b, N, D]
  b = qn.shape[0]
  rows = jnp.asarray(row_offset, jnp.int32) + jnp.arange(b, dtype=jnp.int32)
  row_keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(rows)

  def draw(key, qrow, hard_row):
    ka, kb, kalpha, kc, kbeta = jax.random.split(key, 5)
    n_a = hard_row[jax.random.randint(ka, (num_mix,), 0, num_hard)]
    n_b = hard_row[jax.random.randint(kb, (num_mix,), 0, num_hard)]
    alpha = jax.random.uniform(kalpha, (num_mix, 1))
    type1 = common.l2_normalize(alpha * n_a + (1.0 - alpha) * n_b)
    n_c = hard_row[jax.random.randint(kc, (num_query_mix,), 0, num_hard)]
    beta = jax.random.uniform(kbeta, (num_query_mix, 1), maxval=0.5)
    type2 = common.l2_normalize(beta * qrow[None, :] + (1.0 - beta) * n_c)
    return jnp.concatenate([type1, type2], axis=0)

  return jax.lax.stop_gradient(jax.vmap(draw)(row_keys, qn, hard))


def moco_loss(q, k, queue_keys, temperature=0.2, *, rng=None, num_hard=0, num_mix=0,
              num_query_mix=0, axis_name=None):
  """MoCo-v2 InfoNCE against a queue, optionally with MoCHi synthetic negatives.

  Args:
    q: ``[b, D]`` queries (local rows; any float dtype; gradient flows through them).
    k: ``[b, D]`` keys paired with ``q`` (momentum encoder; stop-gradient inside).
    queue_keys: ``[K_q, D]`` replicated queue (stop-gradient inside).
    temperature: ``τ`` (MoCo-v2: 0.2).
    rng: PRNG key (same on every device), needed when mixing.
    num_hard: ``N`` hard negatives per query (≥ 1 when mixing).
    num_mix: ``s`` type-1 synthetic negatives per query (0: none).
    num_query_mix: ``s'`` type-2 synthetic negatives per query (0: none).
    axis_name: mapped data axis, or None.

  Returns:
    ``(loss, metrics)``: the float32 mean over the global batch of the cross-entropy with
    target 0 over ``[q̂·k̂, q̂·Q̂ᵀ, q̂·Hᵀ, q̂·H'ᵀ] / τ`` (identical on every device, exact
    gradient w.r.t. local ``q``); ``metrics``: ``acc`` (positive logit is the row max),
    ``pos_logit``, ``neg_logit`` (mean queue logit) and, with mixing, ``mix_logit`` (mean
    synthetic logit). Logits are similarities divided by ``τ``.
  """
  mixing = num_mix > 0 or num_query_mix > 0
  if mixing and (rng is None or num_hard < 1):
    raise ValueError("MoCHi mixing needs rng and num_hard >= 1.")
  qn = common.l2_normalize(q)
  kn = jax.lax.stop_gradient(common.l2_normalize(k))
  queue = jax.lax.stop_gradient(common.l2_normalize(queue_keys))
  b = qn.shape[0]
  global_b = b * _num_shards(axis_name)
  pos = jnp.sum(qn * kn, axis=1, keepdims=True) / temperature  # [b, 1]
  neg = (qn @ queue.T) / temperature  # [b, K_q]
  parts = [pos, neg]
  if mixing:
    synth = mix_hard_negatives(qn, queue, rng, num_hard=num_hard, num_mix=num_mix,
                               num_query_mix=num_query_mix,
                               row_offset=common.shard_offset(b, axis_name))
    mix = jnp.einsum("bd,bsd->bs", qn, synth) / temperature  # [b, s + s']
    parts.append(mix)
  logits = jnp.concatenate(parts, axis=1)
  xent = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  loss = common.global_sum(jnp.sum(xent), axis_name) / global_b

  def mean(x):
    return common.global_sum(jnp.sum(x), axis_name) / (global_b * max(x.shape[1], 1))

  metrics = {
      "acc": mean((jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)[:, None]),
      "pos_logit": mean(pos),
      "neg_logit": mean(neg),
  }
  if mixing:
    metrics["mix_logit"] = mean(mix)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

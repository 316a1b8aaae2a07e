"""Gradient accumulation that keeps a contrastive loss's negatives global (GradCache).

Averaging the gradients of K micro-batch losses is not the gradient of a contrastive loss
over the whole batch: each micro-batch would only see its own negatives. GradCache
(Gao et al., 2021) gets the full-batch gradient with the memory of one micro-batch:

1. embed every micro-batch without keeping activations (``embed`` forward only);
2. compute the loss on the full batch of embeddings and its gradient w.r.t. the
   embeddings (the loss is cheap; the embeddings are small);
3. for every micro-batch, run ``embed`` again under ``jax.vjp`` and pull its slice of the
   embedding gradient back to the parameters; the sum over micro-batches is the
   full-batch parameter gradient (the chain rule, split by rows).

An accumulated step therefore equals the full-batch step up to float rounding (tested), at
the cost of a second forward pass. Rows are assigned so that every micro-batch is spread over
every batch shard (device): micro-batch ``k`` holds rows ``k·m … (k+1)·m`` of each shard's
block.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp


def split_microbatches(tree: Any, num_micro: int, num_shards: int = 1) -> Any:
  """``[B, ...]`` leaves -> ``[K, B / K, ...]``, micro-batch ``k`` taking rows
  ``k·m … (k+1)·m`` of each of the ``num_shards`` contiguous blocks (``B = S·K·m``)."""

  def split(x):
    b = x.shape[0]
    if b % (num_micro * num_shards):
      raise ValueError(f"Batch of {b} rows does not split into {num_micro} micro-batches over "
                       f"{num_shards} shards (config.parallel.accum_steps).")
    m = b // (num_micro * num_shards)
    x = x.reshape((num_shards, num_micro, m) + x.shape[1:]).swapaxes(0, 1)
    return x.reshape((num_micro, num_shards * m) + x.shape[3:])

  return jax.tree.map(split, tree)


def merge_microbatches(tree: Any, num_shards: int = 1) -> Any:
  """Inverse of :func:`split_microbatches`: ``[K, B / K, ...]`` -> ``[B, ...]``."""

  def merge(x):
    k, rows = x.shape[:2]
    x = x.reshape((k, num_shards, rows // num_shards) + x.shape[2:]).swapaxes(0, 1)
    return x.reshape((k * rows,) + x.shape[3:])

  return jax.tree.map(merge, tree)


def _differentiable(tree: dict) -> dict:
  return {k: v for k, v in tree.items() if jnp.issubdtype(v.dtype, jnp.inexact)}


def value_and_grad(embed: Callable[[Any, Any], dict], contrast: Callable[[dict], Any],
                   params: Any, batch: Any, *, num_micro: int, num_shards: int = 1,
                   constrain_micro: Optional[Callable] = None,
                   constrain_full: Optional[Callable] = None):
  """``((loss, aux), grads)`` of ``contrast(embed(params, batch))`` w.r.t. ``params``, with
  ``embed`` run on ``num_micro`` micro-batches at a time.

  Args:
    embed: ``(params, batch) -> outputs``; a dict of per-row arrays (leading axis = rows) and
      scalars (``ndim == 0``, identical for every micro-batch, e.g. a logit scale). Rows must
      not interact.
    contrast: ``outputs -> (loss, aux)`` on the full batch's outputs.
    params, batch: the parameters and the full batch (leading axis ``B``).
    num_micro: number of micro-batches ``K`` (``B`` divisible by ``K · num_shards``).
    num_shards: number of contiguous blocks the batch is sharded in (devices in a
      global-view jit; 1 inside a per-device step), so every micro-batch is spread evenly.
    constrain_micro, constrain_full: optional sharding constraints applied to the stacked
      micro-batch trees ``[K, B / K, ...]`` and to full-batch trees ``[B, ...]``.
  """
  keep = lambda f: f if f is not None else (lambda t: t)
  constrain_micro, constrain_full = keep(constrain_micro), keep(constrain_full)
  micro = constrain_micro(split_microbatches(batch, num_micro, num_shards))

  # 1. Embeddings of every micro-batch, no activations kept.
  outs = jax.lax.map(lambda b: embed(jax.lax.stop_gradient(params), b), micro)
  scalars = {k: v[0] for k, v in outs.items() if v.ndim == 1}
  rows = constrain_full(merge_microbatches(
      {k: v for k, v in outs.items() if v.ndim > 1}, num_shards))
  full = {**rows, **scalars}

  # 2. Full-batch loss and its gradient w.r.t. the (differentiable) embeddings.
  diff = _differentiable(full)
  (loss, aux), g_full = jax.value_and_grad(
      lambda d: contrast({**full, **d}), has_aux=True)(diff)

  # 3. Pull each micro-batch's cotangents back through embed; scalars' once.
  g_rows = constrain_micro(split_microbatches(
      {k: v for k, v in g_full.items() if v.ndim > 0}, num_micro, num_shards))
  g_scalars = {k: jnp.zeros((num_micro,), v.dtype).at[0].set(v)
               for k, v in g_full.items() if v.ndim == 0}
  cotangents = {**g_rows, **g_scalars}

  def backward(grads, inputs):
    b, g = inputs
    _, pull = jax.vjp(lambda p: _differentiable(embed(p, b)), params)
    return jax.tree.map(jnp.add, grads, pull(g)[0]), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(backward, zeros, (micro, cotangents))
  return (loss, aux), grads

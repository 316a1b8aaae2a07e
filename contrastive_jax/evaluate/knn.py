"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Test features vote with their ``k`` most cosine-similar training features; neighbour ``j``
adds ``exp(s_j / T)`` to its class (``T`` = 0.1, ``k`` = 200 by default, the InstDisc / DINO
monitor). Similarities are computed in query chunks, so memory is ``chunk × N_train``.
"""

from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.evaluate import embedding, metrics


@functools.partial(jax.jit, static_argnums=4)
def _votes(query, bank, onehot, temperature, k):
  """``[n, C]`` class votes of the ``k`` most similar bank rows (the bank is an argument, not
  a constant baked into the compiled program)."""
  sims, idx = jax.lax.top_k(query @ bank.T, k)
  return jnp.einsum("qk,qkc->qc", jnp.exp(sims / temperature), onehot[idx])


def knn_logits(query, bank, bank_labels, *, num_classes: int, k: int = 200,
               temperature: float = 0.1, chunk: int = 1024) -> np.ndarray:
  """Class scores ``[n_query, num_classes]`` of weighted kNN.

  Args:
    query: float ``[n_query, D]`` features (normalised inside).
    bank: float ``[n_train, D]`` labelled features (normalised inside).
    bank_labels: int ``[n_train]`` labels in ``[0, num_classes)``.
    k: neighbours per query (at most ``n_train``).
    temperature: ``T`` of the ``exp(s / T)`` vote weights.
    chunk: queries scored at once.
  """
  bank = jnp.asarray(embedding.normalize(bank))
  onehot = jax.nn.one_hot(jnp.asarray(bank_labels), num_classes, dtype=jnp.float32)
  k = min(k, bank.shape[0])
  temperature = jnp.float32(temperature)
  query = embedding.normalize(query)
  out = []
  for start in range(0, len(query), chunk):
    q = query[start:start + chunk]
    pad = chunk - len(q)  # one compiled shape for every chunk
    q = np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)]) if pad else q
    out.append(np.asarray(_votes(jnp.asarray(q), bank, onehot, temperature, k))[:chunk - pad])
  return np.concatenate(out)


def evaluate(train_features, train_labels, test_features, test_labels, *, k: int = 200,
             temperature: float = 0.1) -> Dict[str, float]:
  """``acc1``, ``acc5`` and ``mean_per_class_recall`` of weighted kNN (see :func:`knn_logits`)."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  logits = knn_logits(test_features, train_features, train_labels, num_classes=num_classes,
                      k=k, temperature=temperature)
  return metrics.classification_metrics(logits, test_labels)

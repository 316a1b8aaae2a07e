"""Few-shot classification on frozen features: ``k`` examples per class, class-mean prototypes.

Sampling follows CLIP_benchmark's ``fewshot_k``: walk a random permutation of the training
set (here ``np.random.default_rng(seed)``) and keep an example while its class has fewer than
``shots``; every class that occurs in the training labels must reach ``shots`` (CLIP_benchmark
stops with "insufficient data"; here a ``ValueError``). The classifier is closed-form: the
prototype of a class is the normalised mean of its L2-normalised support features, and a test
feature's logits are its cosine similarities to the prototypes (the nearest-class-mean
classifier used as the few-shot baseline of e.g. SimpleShot). Classes without support examples
get ``-inf`` logits.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from contrastive_jax.evaluate import metrics


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sample(labels, shots: int, seed: int = 0) -> np.ndarray:
  """Indices of ``shots`` examples per class, in the order they were drawn.

  Args:
    labels: int ``[N]`` training labels.
    shots: examples per class (``< 0``: every example, in permuted order).
    seed: permutation seed; the same ``(labels, shots, seed)`` give the same indices, and a
      larger ``shots`` keeps the smaller draw as a subset.
  """
  if shots == 0:
    raise ValueError("shots must be positive (or negative for all examples).")
  labels = np.asarray(labels)
  perm = np.random.default_rng(seed).permutation(len(labels))
  if shots < 0:
    return perm
  counts: Dict[int, int] = {}
  keep = []
  for i in perm:
    c = int(labels[i])
    counts[c] = counts.get(c, 0)
    if counts[c] < shots:
      counts[c] += 1
      keep.append(i)
  short = sorted(c for c, n in counts.items() if n < shots)
  if short:
    raise ValueError(f"Insufficient data for {shots}-shot sampling: classes {short} have fewer "
                     f"than {shots} training examples.")
  return np.asarray(keep, np.int64)


def prototypes(features, labels, num_classes: int):
  """``(prototypes [C, D], present bool [C])``: per class the normalised mean of its normalised
  features (zero rows, ``present = False``, for classes without examples)."""
  x = _normalized(features)
  labels = np.asarray(labels)
  sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(sums, labels, x)
  present = np.bincount(labels, minlength=num_classes) > 0
  return _normalized(sums), present


def logits(test_features, protos, present) -> np.ndarray:
  """Cosine similarities ``[M, C]`` of normalised test features to the prototypes; ``-inf``
  for classes without support examples."""
  out = _normalized(test_features) @ protos.T
  return np.where(present[None, :], out, -np.inf)


def evaluate(train_features, train_labels, test_features, test_labels, *, shots: int,
             seed: int = 0, num_classes: Optional[int] = None) -> Dict[str, float]:
  """``shots``-shot nearest-prototype metrics (``acc1``, ``acc5``, ``mean_per_class_recall``).

  Args:
    train_features, train_labels: float ``[N, D]`` / int ``[N]`` pool to sample from.
    test_features, test_labels: float ``[M, D]`` / int ``[M]``.
    shots: support examples per class (``< 0``: all).
    seed: sampling seed.
    num_classes: default ``1 + max label`` over both splits.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = 1 + int(max(train_labels.max(), test_labels.max()))
  idx = sample(train_labels, shots, seed)
  protos, present = prototypes(np.asarray(train_features)[idx], train_labels[idx], num_classes)
  out = metrics.classification_metrics(logits(test_features, protos, present), test_labels,
                                       num_classes=num_classes)
  out["shots"] = shots
  return out

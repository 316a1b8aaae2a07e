"""TFUP: training-free unsupervised prompt adaptation of a zero-shot CLIP classifier.

Long et al. (2024), METHODS.md §2.18 (the training-free variant; TFUP-T's adapters are not
built). Given the *unlabelled* test features ``x`` and the zero-shot text classifier ``T``:

1. **Cache selection** (no labels). Class probabilities ``p = softmax(τ_sel · x̂ T̂ᵀ)``
   (``τ_sel = 10``). Per class ``c``: rank every test image by ``p[:, c]``, keep the top
   ``2s`` candidates, re-rank them by prototype-ness — the sum of ``KL(p_i ‖ p_j)`` to the
   other candidates ``j``, smallest first — and keep ``s`` (``shots``). Their features are the
   cache keys ``F`` and the one-hot pseudo-label ``c`` their values ``L`` (``C · s`` rows; an
   image may enter the caches of several classes, as in the per-class ranking of the paper).
2. **Multi-level similarity.** Feature level ``A = x̂ F̂ᵀ``; semantic level from
   ``K_ij = KL(p_i ‖ p_j^cache)``: per test row, ``norm = (K − min) / (max − min)`` and
   ``sem = 2 · (1 − norm) ∈ [0, 2]`` (the reference standardises the row first; min–max is
   invariant to that affine map, so it is skipped; a constant row gets ``sem = 1``);
   ``A ← A ⊙ sem``.
3. **Prediction** (Tip-Adapter-style cache): ``logits = 100 · x̂ T̂ᵀ + α · exp(−β (1 − A)) L``
   with ``α = 0.3``, ``β = 1`` (:func:`cache_logits`).

Sanity properties (tested): an empty cache (``shots = 0``) or ``α = 0`` is zero-shot
exactly; ``β = 0`` adds the same ``α · s`` to every class (predictions = zero-shot).

Default cache size (the reference's rule): ``s = clip(⌊0.3 · M / C⌋, 9, 16)``.

Everything is float64 numpy: the test set of a benchmark fits in host memory and the
``[M, C·s]`` affinities are computed in row chunks.

Evaluator (``config.eval.evaluators.<name>``, :func:`run_evaluator`): ``kind="tfup"``,
``dataset="shapes"`` (the training source), ``split`` (default ``"test"``),
``num_examples`` (scenes read before keeping the single-object ones; default 4096),
``shots`` / ``alpha`` / ``beta``; pooled embeddings only (not FILIP's token scoring).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from contrastive_jax.data import shapes
from contrastive_jax.evaluate import embedding, metrics, zeroshot

ALPHA = 0.3
BETA = 1.0
SHOTS = None  # the reference's clip(⌊0.3 · M / C⌋, 9, 16)
SELECT_SCALE = 10.0
CLIP_LOGIT_SCALE = 100.0


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def kl_matrix(p, q) -> np.ndarray:
  """``[M, N]`` ``KL(p_i ‖ q_j)`` of probability rows ``p [M, C]`` and ``q [N, C]``."""
  p = np.clip(np.asarray(p, np.float64), 1e-12, None)
  q = np.clip(np.asarray(q, np.float64), 1e-12, None)
  return np.sum(p * np.log(p), axis=1)[:, None] - p @ np.log(q).T


def cache_logits(x, keys, values, beta: float = BETA, *, weights=None) -> np.ndarray:
  """Tip-Adapter cache logits ``exp(−β (1 − A)) @ values`` with ``A = x̂ keŷsᵀ [⊙ weights]``.

  Args:
    x: float ``[M, D]`` query features (normalised here).
    keys: float ``[S, D]`` cache features (normalised here).
    values: float ``[S, C]`` cache labels (one-hot or soft).
    beta: sharpness ``β``.
    weights: optional ``[M, S]`` multiplier of the affinities (TFUP's semantic level).

  Returns:
    float64 ``[M, C]``; zeros when the cache is empty.
  """
  values = np.asarray(values, np.float64)
  if len(values) == 0:
    return np.zeros((len(x), values.shape[-1]))
  affinity = _normalized(x) @ _normalized(keys).T
  if weights is not None:
    affinity = affinity * weights
  return np.exp(-beta * (1.0 - affinity)) @ values


def zeroshot_logits(features, text_classifier, *, scale: float = CLIP_LOGIT_SCALE):
  """``scale · x̂ T̂ᵀ`` ``[M, C]``."""
  return scale * (_normalized(features) @ _normalized(text_classifier).T)


def default_shots(num_images: int, num_classes: int) -> int:
  """The reference's cache size ``clip(⌊0.3 · M / C⌋, 9, 16)``."""
  return int(min(16, max(9, int(num_images * 0.3 / num_classes))))


def select_cache(probs, shots: Optional[int] = SHOTS) -> Tuple[np.ndarray, np.ndarray]:
  """Step 1: ``(indices [C·s'], pseudo_labels [C·s'])`` of the cache, class-major.

  Args:
    probs: float ``[M, C]`` zero-shot class probabilities of the unlabelled images.
    shots: ``s`` cached images per class (``s' = min(s, M)``; 0: empty cache; None:
      :func:`default_shots`).
  """
  probs = np.asarray(probs, np.float64)
  m, c = probs.shape
  s = min(default_shots(m, c) if shots is None else int(shots), m)
  if s <= 0:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  candidates = min(2 * s, m)
  idx, lab = [], []
  for k in range(c):
    top = np.argsort(-probs[:, k], kind="stable")[:candidates]
    p = probs[top]
    kl = kl_matrix(p, p).sum(axis=1)  # KL(p_i ‖ p_i) = 0: sum over the others
    keep = top[np.argsort(kl, kind="stable")[:s]]
    idx.append(keep)
    lab.append(np.full(s, k))
  return np.concatenate(idx), np.concatenate(lab)


def semantic_weights(probs, cache_probs) -> np.ndarray:
  """Step 2's semantic level ``[M, S]``: ``2 · (1 − minmax_row(KL(p_i ‖ p_j^cache)))``."""
  kl = kl_matrix(probs, cache_probs)
  lo, hi = kl.min(axis=1, keepdims=True), kl.max(axis=1, keepdims=True)
  span = hi - lo
  norm = np.where(span > 0, (kl - lo) / np.where(span > 0, span, 1.0), 0.5)
  return 2.0 * (1.0 - norm)


def tfup_logits(features, text_classifier, *, shots: Optional[int] = SHOTS, alpha: float = ALPHA,
                beta: float = BETA, select_scale: float = SELECT_SCALE,
                scale: float = CLIP_LOGIT_SCALE, semantic: bool = True,
                chunk: int = 4096) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """TFUP logits of the unlabelled set ``features`` (the cache is built from it).

  Args:
    features: float ``[M, D]`` image features (the whole unlabelled target set).
    text_classifier: float ``[C, D]`` class embeddings of the zero-shot classifier.
    shots: ``s`` cached images per class (None: :func:`default_shots`).
    alpha, beta: cache weight and sharpness.
    select_scale: ``τ_sel`` of the pseudo-labelling probabilities.
    scale: logit scale of the zero-shot term (CLIP: 100).
    semantic: multiply the affinities by the semantic level (False: plain Tip-Adapter cache).
    chunk: test rows per affinity block.

  Returns:
    ``(logits [M, C] float64, info)`` with ``info["cache_index"]``, ``info["cache_label"]``
    and ``info["zeroshot"]`` (the zero-shot logits).
  """
  x = _normalized(features)
  zs = zeroshot_logits(features, text_classifier, scale=scale)
  probs = _softmax(select_scale * (x @ _normalized(text_classifier).T))
  index, label = select_cache(probs, shots)
  values = np.eye(zs.shape[1])[label]
  out = zs.copy()
  for start in range(0, len(x), chunk):
    rows = slice(start, start + chunk)
    weights = semantic_weights(probs[rows], probs[index]) if semantic and len(index) else None
    out[rows] += alpha * cache_logits(x[rows], x[index], values, beta, weights=weights)
  return out, {"cache_index": index, "cache_label": label, "zeroshot": zs}


def evaluate(features, labels, text_classifier, *, shots: Optional[int] = SHOTS,
             alpha: float = ALPHA, beta: float = BETA,
             num_classes: Optional[int] = None) -> Dict[str, float]:
  """TFUP metrics on a labelled test set whose labels are used only for scoring.

  Returns ``acc1``/``acc5``/``mean_per_class_recall`` of TFUP, ``zeroshot_acc1`` of the same
  features, ``cache_acc`` (fraction of cache entries whose pseudo-label is right) and
  ``shots``.
  """
  labels = np.asarray(labels)
  k = len(text_classifier) if num_classes is None else num_classes
  logits, info = tfup_logits(features, text_classifier, shots=shots, alpha=alpha, beta=beta)
  out = metrics.classification_metrics(logits, labels, num_classes=k)
  out["zeroshot_acc1"] = metrics.classification_metrics(info["zeroshot"], labels)["acc1"]
  idx = info["cache_index"]
  out["cache_acc"] = float(np.mean(labels[idx] == info["cache_label"])) if len(idx) else 0.0
  out["shots"] = len(idx) // k
  return out


def evaluator_features(name, ev, config, encoders, variables, mesh, default_examples=4096):
  """``(features [n, E], labels [n])`` of an evaluator's labelled split of the training
  source (shapes: the single-object scenes among the first ``num_examples``)."""
  if ev.dataset != config.data.source:
    raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; {ev.kind} reads "
                     f"the training source config.data.source={config.data.source!r}.")
  return embedding.labelled_image_features(
      encoders, variables, config.data, mesh, config.eval.batch_size,
      split=ev.get("split", "test"), num_examples=ev.get("num_examples", default_examples))


def run_evaluator(name, ev, config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """The ``tfup`` evaluator on shapes (see the module docstring)."""
  if ev.dataset != "shapes" or tokenizer is None:
    raise ValueError(f"config.eval.evaluators.{name}: tfup needs an image-text model and "
                     f"dataset='shapes' (its class prompts); got {ev.dataset!r}.")
  features, labels = evaluator_features(name, ev, config, encoders, variables, mesh)
  weights = zeroshot.classifier(encoders, variables, tokenizer, shapes.CLASS_NAMES,
                                shapes.PROMPT_TEMPLATES, mesh, config.eval.batch_size)
  return evaluate(features, labels, weights, shots=ev.get("shots", SHOTS),
                  alpha=ev.get("alpha", ALPHA), beta=ev.get("beta", BETA))

"""GDA: Gaussian discriminant analysis on CLIP features, ensembled with zero-shot logits.

Training-free few-shot adaptation of Wang et al. (ICLR 2024), METHODS.md §1.17. From the
L2-normalised support features ``f`` (all augmented views; the reference uses 10 random
resized crop + flip views per image) with class means ``μ_c`` and within-class residuals
``Z = f - μ_class(f)`` (``N × D``), the shared-covariance precision is the reference code's
shrinkage ("KS") estimate

    Σ̂ = ZᵀZ / (N - 1),    Σ⁻¹ ≈ D · pinv((N - 1) Σ̂ + shrink · tr(Σ̂) · I)

(``shrink = 1`` in the reference), and the linear discriminant is

    W = Σ⁻¹ μᵀ  [D, K],    b_c = log π_c - ½ μ_cᵀ Σ⁻¹ μ_c,    π_c = 1 / K.

Prediction ensembles it with zero-shot CLIP: ``logits = 100 · x̂ᵀ T + α · (x̂ᵀ W + b)``, ``T``
the normalised class-prompt embeddings, ``α`` chosen on a validation split from
``{1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100}`` (first best, strict improvement; 0.1 when nothing
beats zero accuracy, as in the reference).

Sanity properties (tested): ``α = 0`` is zero-shot CLIP; if every support feature equals its
class mean, ``Σ̂ = 0``, ``pinv(0) = 0`` so ``W = 0`` and ``b = log π``: the GDA term is constant
and predictions equal zero-shot (no NaNs). Pitfall not inherited: the reference's ImageNet run
selects ``α`` on the test set (its validation features *are* the test features); here the
validation split is always explicit.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from contrastive_jax.evaluate import metrics

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
CLIP_LOGIT_SCALE = 100.0


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gda_fit(features, labels, *, num_classes: Optional[int] = None, shrink: float = 1.0,
            normalize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """Fits the shared-covariance Gaussian discriminant.

  Args:
    features: float ``[N, D]`` support features (every augmented view of every shot).
    labels: int ``[N]`` classes in ``[0, K)``; every class needs at least one example.
    num_classes: ``K`` (default ``1 + max label``).
    shrink: weight of the ``tr(Σ̂) · I`` ridge (the reference's estimator: 1).
    normalize: L2-normalise the features first (the reference does).

  Returns:
    ``(W [D, K], b [K])`` float64, with GDA logits ``x @ W + b``.
  """
  x = _normalized(features) if normalize else np.asarray(features, np.float64)
  labels = np.asarray(labels)
  n, d = x.shape
  k = 1 + int(labels.max()) if num_classes is None else int(num_classes)
  counts = np.bincount(labels, minlength=k)
  if len(counts) > k or not counts.all():
    raise ValueError(f"Every class in [0, {k}) needs support examples; counts {counts.tolist()}.")
  if n < 2:
    raise ValueError("GDA needs at least two support features.")
  mus = np.zeros((k, d))
  np.add.at(mus, labels, x)
  mus /= counts[:, None]
  z = x - mus[labels]
  scatter = z.T @ z                      # (N - 1) Σ̂
  trace_cov = np.trace(scatter) / (n - 1)  # tr(Σ̂)
  # Cut-off of torch.linalg.pinv's default (max(D, D) · eps relative), as in the reference.
  precision = d * np.linalg.pinv(scatter + shrink * trace_cov * np.eye(d),
                                 rcond=d * np.finfo(np.float64).eps, hermitian=True)
  w = precision @ mus.T
  b = np.log(np.full(k, 1.0 / k)) - 0.5 * np.einsum("kd,dk->k", mus, w)
  return w, b


def gda_logits(features, w, b, *, normalize: bool = True) -> np.ndarray:
  """GDA logits ``[M, K] = x̂ @ W + b`` (features normalised unless ``normalize=False``)."""
  x = _normalized(features) if normalize else np.asarray(features, np.float64)
  return x @ w + b


def zeroshot_logits(features, text_classifier, *, scale: float = CLIP_LOGIT_SCALE) -> np.ndarray:
  """``scale · x̂ᵀ T`` ``[M, K]``: normalised image features against the normalised class
  embeddings ``text_classifier`` ``[K, D]`` (as built by ``zeroshot.classifier``)."""
  return scale * (_normalized(features) @ _normalized(text_classifier).T)


def ensemble(zs_logits, gda_logits_, alpha: float) -> np.ndarray:
  """``zs_logits + alpha · gda_logits_`` (both ``[M, K]``)."""
  return np.asarray(zs_logits) + alpha * np.asarray(gda_logits_)


def select_alpha(zs_logits, gda_logits_, labels, alphas: Sequence[float] = ALPHAS,
                 default: float = 0.1) -> Tuple[float, float]:
  """``(alpha, val_acc1)``: the first ``alpha`` with the highest validation accuracy (strict
  improvement over the running best, which starts at accuracy 0 with ``default``)."""
  labels = np.asarray(labels)
  best_alpha, best_acc = default, 0.0
  for alpha in alphas:
    acc = float(np.mean(np.argmax(ensemble(zs_logits, gda_logits_, alpha), axis=1) == labels))
    if acc > best_acc:
      best_alpha, best_acc = alpha, acc
  return best_alpha, best_acc


def evaluate(support_features, support_labels, val_features, val_labels, test_features,
             test_labels, text_classifier, *, alphas: Sequence[float] = ALPHAS,
             shrink: float = 1.0, scale: float = CLIP_LOGIT_SCALE) -> Dict[str, float]:
  """GDA + zero-shot ensemble: fit on the support set, pick ``alpha`` on the validation split,
  report test ``acc1``/``acc5``/``mean_per_class_recall`` plus ``alpha``, ``val_acc1`` and the
  zero-shot ``zeroshot_acc1`` of the same test features.

  Args:
    support_features, support_labels: ``[N, D]`` / ``[N]`` (augmented) few-shot features.
    val_features, val_labels, test_features, test_labels: ``[·, D]`` / ``[·]``.
    text_classifier: ``[K, D]`` class embeddings of the zero-shot classifier.
  """
  k = len(text_classifier)
  w, b = gda_fit(support_features, support_labels, num_classes=k, shrink=shrink)
  zs_val = zeroshot_logits(val_features, text_classifier, scale=scale)
  alpha, val_acc = select_alpha(zs_val, gda_logits(val_features, w, b), val_labels, alphas)
  zs_test = zeroshot_logits(test_features, text_classifier, scale=scale)
  out = metrics.classification_metrics(ensemble(zs_test, gda_logits(test_features, w, b), alpha),
                                       test_labels, num_classes=k)
  out["zeroshot_acc1"] = metrics.classification_metrics(zs_test, test_labels)["acc1"]
  out.update(alpha=float(alpha), val_acc1=val_acc)
  return out

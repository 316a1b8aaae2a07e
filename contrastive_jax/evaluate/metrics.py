"""Evaluation metrics on embeddings/logits, defined as CLIP_benchmark defines them (numpy)."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """Zero-shot / linear classification metrics.

  Args:
    logits: ``[N, C]`` scores.
    labels: int ``[N]`` true classes in ``[0, C)``.

  Returns:
    ``acc1``; ``acc5`` only when ``C ≥ 5``; ``mean_per_class_recall``: the mean over the
    classes present in ``labels`` of the fraction of their examples predicted correctly
    (balanced accuracy, as CLIP_benchmark computes it).
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match.")
  order = np.argsort(-logits, axis=1, kind="stable")
  pred = order[:, 0]
  out = {"acc1": float(np.mean(pred == labels))}
  if logits.shape[1] >= 5:
    out["acc5"] = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
  present = np.unique(labels)
  out["mean_per_class_recall"] = float(np.mean([np.mean(pred[labels == c] == c) for c in present]))
  return out


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
  """Fraction of queries (rows) with at least one positive among their top-k candidates.

  Args:
    scores: ``[Q, M]`` query-candidate similarities.
    positives: bool ``[Q, M]``; every query needs at least one positive.
  """
  scores = np.asarray(scores)
  positives = np.asarray(positives, bool)
  if scores.shape != positives.shape:
    raise ValueError(f"scores {scores.shape} and positives {positives.shape} do not match.")
  if not positives.any(axis=1).all():
    raise ValueError("Every retrieval query needs at least one positive.")
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(positives, order, axis=1)
  return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, positives: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
  """Image->text and text->image recall@k on L2-normalised embeddings.

  Args:
    image_emb: ``[N_img, E]``; text_emb: ``[N_txt, E]`` (normalised).
    positives: bool ``[N_img, N_txt]``, True where the text describes the image.
  """
  scores = np.asarray(image_emb) @ np.asarray(text_emb).T
  return retrieval_metrics_from_scores(scores, scores.T, positives, ks)


def retrieval_metrics_from_scores(i2t: np.ndarray, t2i: np.ndarray, positives: np.ndarray,
                                  ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
  """Recall@k from ``i2t [N_img, N_txt]`` and ``t2i [N_txt, N_img]`` scores (which need not
  be transposes of each other, as with late interaction)."""
  positives = np.asarray(positives, bool)
  out = {}
  for k, v in recall_at_k(i2t, positives, ks).items():
    out[f"i2t_recall@{k}"] = v
  for k, v in recall_at_k(t2i, positives.T, ks).items():
    out[f"t2i_recall@{k}"] = v
  return out

"""Evaluation metrics on embeddings/logits, defined as CLIP_benchmark defines them (numpy)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           num_classes: Optional[int] = None) -> Dict[str, float]:
  """Single-label classification metrics, as CLIP_benchmark reports them.

  Args:
    logits: float ``[N, C]`` scores.
    labels: int ``[N]`` true classes in ``[0, C)``.
    num_classes: the dataset's number of classes (default ``C``); it only decides whether
      ``acc5`` is reported.

  Returns:
    ``acc1``; ``acc5`` only when ``num_classes >= 5`` (CLIP_benchmark's zero-shot rule
    ``len(classes) >= 5``; it writes NaN otherwise, here the key is absent);
    ``mean_per_class_recall``: sklearn's ``balanced_accuracy_score(labels, argmax)``, i.e. the
    mean over the classes *present in* ``labels`` of the fraction of their examples predicted
    correctly; classes without test examples are left out even when predicted (sklearn drops
    their 0/0 recall with a warning).

  Ties: among equal scores the lower class index ranks first, for ``acc1``/``acc5`` and the
  prediction alike (``torch.argmax`` also returns the first maximum; ``torch.topk``, behind
  CLIP_benchmark's ``acc1``/``acc5``, leaves the order of ties unspecified).
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match.")
  if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
    raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got "
                     f"[{labels.min()}, {labels.max()}].")
  num_classes = logits.shape[1] if num_classes is None else int(num_classes)
  if num_classes > logits.shape[1]:
    raise ValueError(f"num_classes={num_classes} exceeds the {logits.shape[1]} logit columns.")
  order = np.argsort(-logits, axis=1, kind="stable")
  pred = order[:, 0]
  out = {"acc1": float(np.mean(pred == labels))}
  if num_classes >= 5:
    out["acc5"] = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
  present = np.unique(labels)
  out["mean_per_class_recall"] = float(np.mean([np.mean(pred[labels == c] == c) for c in present]))
  return out


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int]) -> Dict[int, float]:
  """Fraction of queries (rows) with at least one positive among their top-k candidates
  (CLIP_benchmark's ``recall_at_k``: with several captions per image, an image query counts
  as found when any of its captions is in the top k).

  Args:
    scores: ``[Q, M]`` query-candidate similarities.
    positives: bool ``[Q, M]``; every query needs at least one positive.

  Ties: equal scores rank by candidate index (lower first), deterministically; CLIP_benchmark's
  ``torch.topk`` leaves their order unspecified.
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

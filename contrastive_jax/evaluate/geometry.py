"""The ``geometry`` evaluator: uniformity, alignment and tolerance of the eval embeddings.

Metrics (METHODS.md §2.1; the definitions of :mod:`contrastive_jax.losses.geometry`, computed
here in float64 numpy, in row chunks, so thousands of examples fit):

* ``uniformity``: ``log mean_{i≠j} exp(−t ‖x̂_i − x̂_j‖²)`` of the image embeddings (t = 2);
* ``alignment``: ``mean_i ‖x̂_i − ŷ_i‖²`` between each image and its positive: its caption's
  embedding for image-text models, the embedding of the horizontally flipped image for
  image-only models (``pairs``: ``"auto"`` (default, caption when the config has a tokenizer),
  ``"caption"`` or ``"flip"``);
* ``tolerance``: mean cosine similarity of distinct same-label image pairs (labelled
  examples only; absent when the split has no labels).

Config (``config.eval.evaluators.<name>``): ``kind="geometry"``, ``dataset`` (the training
source ``config.data.source``), ``split`` (default ``"test"``), ``num_examples`` (default
1024; None: the whole split), ``t``, ``pairs``; on ``shards`` sources also ``shards``.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import embedding

PAIRS = ("auto", "caption", "flip")


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def metrics_from_features(x: np.ndarray, y: Optional[np.ndarray] = None,
                          labels: Optional[np.ndarray] = None, *, t: float = 2.0,
                          chunk: int = 1024) -> Dict[str, float]:
  """``uniformity`` of ``x [n, D]``, ``alignment`` of ``(x, y)`` (when ``y [n, D]`` is given)
  and ``tolerance`` of ``x`` with int ``labels [n]`` (−1 ignored; when given)."""
  x = _normalize(x)
  n = len(x)
  gauss, same_sum, same_count = 0.0, 0.0, 0
  for start in range(0, n, chunk):
    rows = x[start:start + chunk]
    cos = rows @ x.T
    own = np.arange(len(rows)), start + np.arange(len(rows))
    k = np.exp(-t * np.maximum(2.0 - 2.0 * cos, 0.0))
    k[own] = 0.0
    gauss += k.sum()
    if labels is not None:
      lab = labels[start:start + chunk]
      same = (lab[:, None] == labels[None, :]) & (lab[:, None] >= 0)
      same[own] = False
      same_sum += cos[same].sum()
      same_count += int(same.sum())
  out = {"uniformity": float(np.log(gauss / max(n * (n - 1), 1))) if n > 1 else 0.0}
  if y is not None:
    out["alignment"] = float(np.mean(np.sum((x - _normalize(y)) ** 2, axis=-1)))
  if labels is not None and same_count:
    out["tolerance"] = float(same_sum / same_count)
  return out


def _dataset(ev, config, tokenizer, image_text: bool):
  num = ev.get("num_examples", 1024)
  split = ev.get("split", "test")
  if image_text and ev.dataset in pipeline.STREAM_SOURCES:
    return pipeline.stream_eval_dataset(config.data, tokenizer, split=split,
                                        shards=ev.get("shards"), num_examples=num)
  if image_text:
    return pipeline.eval_dataset(config.data, tokenizer, split=split, num_examples=num,
                                 text_key=config.data.get("text_key", "caption"))
  return pipeline.image_eval_dataset(config.data, split=split, num_examples=num)


def evaluate(name, ev, config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """Runs the ``geometry`` evaluator ``config.eval.evaluators.<name>`` (see the module
  docstring); ``encoders`` / ``variables`` as for the other evaluators."""
  if ev.dataset != config.data.source:
    raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; geometry reads "
                     f"the training source config.data.source={config.data.source!r}.")
  pairs = ev.get("pairs", "auto")
  if pairs not in PAIRS:
    raise ValueError(f"config.eval.evaluators.{name}.pairs={pairs!r}; expected one of {PAIRS}.")
  image_text = pairs == "caption" or (pairs == "auto" and tokenizer is not None)
  if image_text and tokenizer is None:
    raise ValueError(f"config.eval.evaluators.{name}.pairs='caption' needs a tokenizer.")
  batch_size = config.eval.batch_size
  batches = []
  for batch in _dataset(ev, config, tokenizer, image_text).batch(batch_size).as_numpy_iterator():
    if image_text and batch["text"].ndim == 3:  # every caption: keep the first
      batch["text"], batch["text_mask"] = batch["text"][:, 0], batch["text_mask"][:, 0]
    if not image_text:
      batch["flipped"] = batch["image"][:, :, ::-1]
    batches.append(batch)
  if not batches:
    raise ValueError(f"config.eval.evaluators.{name}: the evaluation split is empty.")
  x = embedding.embed_batches(encoders.image, variables, batches, ("image",), mesh, batch_size)
  if image_text:
    y = embedding.embed_batches(encoders.text, variables, batches, ("text", "text_mask"), mesh,
                                batch_size)
  else:
    y = embedding.embed_batches(encoders.image, variables, batches, ("flipped",), mesh,
                                batch_size)
  labels = np.concatenate([b["label"] for b in batches]) if "label" in batches[0] else None
  return metrics_from_features(x, y, labels, t=ev.get("t", 2.0))

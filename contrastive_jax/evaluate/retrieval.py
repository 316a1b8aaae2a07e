"""Image<->text retrieval on paired examples; a query hits when any positive is in the top K."""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, late_interaction, metrics


def _caption_batches(dataset: tf.data.Dataset, batch_size: int, store: list):
  """Batches of ``batch_size`` single captions from examples with ``text [K, L]``,
  ``text_mask`` and ``text_valid [K]``; ``store`` gets ``(image row, tokens, mask)``."""
  pending_t, pending_m = [], []
  row = 0
  for batch in dataset.batch(batch_size).as_numpy_iterator():
    valid = batch["text_valid"]
    images, _ = np.nonzero(valid)
    store.append((row + images, batch["text"][valid], batch["text_mask"][valid]))
    row += len(valid)
    pending_t.extend(batch["text"][valid])
    pending_m.extend(batch["text_mask"][valid])
    while len(pending_t) >= batch_size:
      yield {"text": np.stack(pending_t[:batch_size]),
             "text_mask": np.stack(pending_m[:batch_size])}
      del pending_t[:batch_size], pending_m[:batch_size]
  if pending_t:
    yield {"text": np.stack(pending_t), "text_mask": np.stack(pending_m)}


def evaluate(encoders, variables, dataset: tf.data.Dataset, mesh, batch_size: int,
             ks=(1, 5, 10), scoring: str = "pooled") -> Dict[str, float]:
  """Recall@K both ways over a dataset of examples with ``image``, ``text``, ``text_mask``.

  Single-caption examples (``text [L]``): texts are positives of every image whose caption
  has the same tokens (captions of procedurally generated scenes repeat), and of their own
  image. Multi-caption examples (``text [K, L]`` with ``text_valid [K]``, e.g. COCO's five
  captions): every valid caption is a text query whose positive is its own image, and an
  image query hits when any of its captions is in the top K. ``scoring="pooled"`` ranks by
  the cosine of pooled embeddings; ``"late_interaction"`` by FILIP's token-wise scores,
  image→text for image queries and text→image for text queries.
  """
  token_level = scoring == "late_interaction"
  image_fn = encoders.image_tokens if token_level else encoders.image
  text_fn = encoders.text_tokens if token_level else encoders.text
  multi = "text_valid" in dataset.element_spec
  tokens, masks = [], []

  def batches(store):
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      if store:
        tokens.append(batch["text"])
        masks.append(batch["text_mask"])
      yield batch

  images = embedding.embed_batches(image_fn, variables, batches(False), ("image",), mesh,
                                   batch_size)
  if multi:
    stored = []
    texts = embedding.embed_batches(text_fn, variables,
                                    _caption_batches(dataset, batch_size, stored),
                                    ("text", "text_mask"), mesh, batch_size)
    owner = np.concatenate([o for o, _, _ in stored])
    positives = owner[None, :] == np.arange(len(images))[:, None]
    text_mask = np.concatenate([m for _, _, m in stored])
  else:
    texts = embedding.embed_batches(text_fn, variables, batches(True), ("text", "text_mask"),
                                    mesh, batch_size)
    _, caption_id = np.unique(np.concatenate(tokens), axis=0, return_inverse=True)
    caption_id = caption_id.reshape(-1)
    positives = caption_id[:, None] == caption_id[None, :]
    text_mask = np.concatenate(masks)
  if not token_level:
    return metrics.retrieval_metrics(embedding.normalize(images), embedding.normalize(texts),
                                     positives, ks)
  image_mask = np.ones(images.shape[:2], bool)
  i2t = late_interaction.scores(images, image_mask, texts, text_mask)
  t2i = late_interaction.scores(texts, text_mask, images, image_mask)
  return metrics.retrieval_metrics_from_scores(i2t, t2i, positives, ks)

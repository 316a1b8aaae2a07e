"""Image<->text retrieval on paired examples; a query hits when any positive is in the top K."""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, metrics


def evaluate(encoders, params, dataset: tf.data.Dataset, mesh, batch_size: int,
             ks=(1, 5, 10)) -> Dict[str, float]:
  """Recall@K both ways over a dataset of examples with ``image``, ``text``, ``text_mask``.

  Texts are positives of every image whose caption has the same tokens (captions of
  procedurally generated scenes repeat), and of their own image.
  """
  image_fn, text_fn = encoders
  tokens = []

  def batches(store):
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      if store:
        tokens.append(batch["text"])
      yield batch

  images = embedding.embed_batches(image_fn, params, batches(True), ("image",), mesh, batch_size)
  texts = embedding.embed_batches(text_fn, params, batches(False), ("text", "text_mask"), mesh,
                                  batch_size)
  tokens = np.concatenate(tokens)
  _, caption_id = np.unique(tokens, axis=0, return_inverse=True)
  caption_id = caption_id.reshape(-1)
  positives = caption_id[:, None] == caption_id[None, :]
  return metrics.retrieval_metrics(embedding.normalize(images), embedding.normalize(texts),
                                   positives, ks)

"""Image<->text retrieval on paired examples; a query hits when any positive is in the top K."""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, late_interaction, metrics


def evaluate(encoders, variables, dataset: tf.data.Dataset, mesh, batch_size: int,
             ks=(1, 5, 10), scoring: str = "pooled") -> Dict[str, float]:
  """Recall@K both ways over a dataset of examples with ``image``, ``text``, ``text_mask``.

  Texts are positives of every image whose caption has the same tokens (captions of
  procedurally generated scenes repeat), and of their own image. ``scoring="pooled"``
  ranks by the cosine of pooled embeddings; ``"late_interaction"`` by FILIP's token-wise
  scores, image→text for image queries and text→image for text queries.
  """
  tokens, masks = [], []

  def batches(store):
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      if store:
        tokens.append(batch["text"])
        masks.append(batch["text_mask"])
      yield batch

  token_level = scoring == "late_interaction"
  image_fn = encoders.image_tokens if token_level else encoders.image
  text_fn = encoders.text_tokens if token_level else encoders.text
  images = embedding.embed_batches(image_fn, variables, batches(True), ("image",), mesh, batch_size)
  texts = embedding.embed_batches(text_fn, variables, batches(False), ("text", "text_mask"), mesh,
                                  batch_size)
  tokens = np.concatenate(tokens)
  _, caption_id = np.unique(tokens, axis=0, return_inverse=True)
  caption_id = caption_id.reshape(-1)
  positives = caption_id[:, None] == caption_id[None, :]
  if not token_level:
    return metrics.retrieval_metrics(embedding.normalize(images), embedding.normalize(texts),
                                     positives, ks)
  text_mask = np.concatenate(masks)
  image_mask = np.ones(images.shape[:2], bool)
  i2t = late_interaction.scores(images, image_mask, texts, text_mask)
  t2i = late_interaction.scores(texts, text_mask, images, image_mask)
  return metrics.retrieval_metrics_from_scores(i2t, t2i, positives, ks)

"""Image<->text retrieval on paired examples; a query hits when any positive is in the top K."""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, late_interaction, metrics


def _chunks(tokens: np.ndarray, mask: np.ndarray, batch_size: int):
  for i in range(0, len(tokens), batch_size):
    yield {"text": tokens[i:i + batch_size], "text_mask": mask[i:i + batch_size]}


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
  tokens, masks, owners = [], [], []

  def batches():  # one pass: images go to the encoder, captions are kept for the text pass
    row = 0
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      if multi:  # every valid caption, with the row of its image
        valid = batch["text_valid"]
        owners.append(row + np.nonzero(valid)[0])
        tokens.append(batch["text"][valid])
        masks.append(batch["text_mask"][valid])
        row += len(valid)
      else:
        tokens.append(batch["text"])
        masks.append(batch["text_mask"])
      yield batch

  images = embedding.embed_batches(image_fn, variables, batches(), ("image",), mesh,
                                   batch_size)
  tokens, text_mask = np.concatenate(tokens), np.concatenate(masks)
  texts = embedding.embed_batches(text_fn, variables, _chunks(tokens, text_mask, batch_size),
                                  ("text", "text_mask"), mesh, batch_size)
  if multi:
    positives = np.concatenate(owners)[None, :] == np.arange(len(images))[:, None]
  else:
    _, caption_id = np.unique(tokens, axis=0, return_inverse=True)
    caption_id = caption_id.reshape(-1)
    positives = caption_id[:, None] == caption_id[None, :]
  if not token_level:
    return metrics.retrieval_metrics(embedding.normalize(images), embedding.normalize(texts),
                                     positives, ks)
  image_mask = np.ones(images.shape[:2], bool)
  i2t = late_interaction.scores(images, image_mask, texts, text_mask)
  t2i = late_interaction.scores(texts, text_mask, images, image_mask)
  return metrics.retrieval_metrics_from_scores(i2t, t2i, positives, ks)

"""Zero-shot classification: prompts -> text classifier -> image logits -> metrics."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, metrics


def embed_texts(encoders, params, tokenizer, texts: Sequence[str], mesh, batch_size: int):
  """Normalised embeddings ``[len(texts), E]`` of Python strings."""
  tokens, mask = (t.numpy() for t in tokenizer.tokenize(tf.constant(list(texts))))
  batches = ({"text": tokens[i:i + batch_size], "text_mask": mask[i:i + batch_size]}
             for i in range(0, len(texts), batch_size))
  emb = embedding.embed_batches(encoders[1], params, batches, ("text", "text_mask"),
                                mesh, batch_size)
  return embedding.normalize(emb)


def classifier(encoders, params, tokenizer, class_names: Sequence[str],
               templates: Sequence[str], mesh, batch_size: int) -> np.ndarray:
  """``[C, E]``: per class, the mean of its normalised template embeddings, normalised.

  ``templates`` are format strings with one ``{}`` or callables ``class_name -> prompt``.
  """
  texts = [t(c) if callable(t) else t.format(c) for c in class_names for t in templates]
  emb = embed_texts(encoders, params, tokenizer, texts, mesh, batch_size)
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return embedding.normalize(emb)


def evaluate(encoders, params, tokenizer, dataset: tf.data.Dataset, class_names, templates,
             mesh, batch_size: int) -> Dict[str, float]:
  """Zero-shot metrics (``acc1``, ``acc5``, ``mean_per_class_recall``) on a dataset of
  preprocessed examples with ``image`` and ``label`` keys; ``encoders`` from
  :func:`embedding.jitted_encoders`."""
  weights = classifier(encoders, params, tokenizer, class_names, templates, mesh, batch_size)
  labels = []

  def batches():
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      labels.append(batch["label"])
      yield batch

  images = embedding.embed_batches(encoders[0], params, batches(), ("image",), mesh,
                                   batch_size)
  logits = embedding.normalize(images) @ weights.T
  return metrics.classification_metrics(logits, np.concatenate(labels))

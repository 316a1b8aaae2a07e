"""Zero-shot classification: prompts -> text classifier -> image logits -> metrics."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import tensorflow as tf

from contrastive_jax.evaluate import embedding, late_interaction, metrics

SCORINGS = ("pooled", "late_interaction")


def _prompts(class_names, templates):
  return [t(c) if callable(t) else t.format(c) for c in class_names for t in templates]


def _text_batches(tokenizer, texts, batch_size):
  tokens, mask = (t.numpy() for t in tokenizer.tokenize(tf.constant(list(texts))))
  batches = [{"text": tokens[i:i + batch_size], "text_mask": mask[i:i + batch_size]}
             for i in range(0, len(texts), batch_size)]
  return batches, mask


def embed_texts(encoders, variables, tokenizer, texts: Sequence[str], mesh, batch_size: int):
  """Normalised embeddings ``[len(texts), E]`` of Python strings."""
  batches, _ = _text_batches(tokenizer, texts, batch_size)
  emb = embedding.embed_batches(encoders.text, variables, batches, ("text", "text_mask"),
                                mesh, batch_size)
  return embedding.normalize(emb)


def classifier(encoders, variables, tokenizer, class_names: Sequence[str],
               templates: Sequence[str], mesh, batch_size: int) -> np.ndarray:
  """``[C, E]``: per class, the mean of its normalised template embeddings, normalised.

  ``templates`` are format strings with one ``{}`` or callables ``class_name -> prompt``.
  """
  emb = embed_texts(encoders, variables, tokenizer, _prompts(class_names, templates), mesh,
                    batch_size)
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return embedding.normalize(emb)


def evaluate(encoders, variables, tokenizer, dataset: tf.data.Dataset, class_names, templates,
             mesh, batch_size: int, scoring: str = "pooled") -> Dict[str, float]:
  """Zero-shot metrics (``acc1``, ``acc5``, ``mean_per_class_recall``) on a dataset of
  preprocessed examples with ``image`` and ``label`` keys; ``encoders`` from
  :func:`embedding.jitted_encoders`.

  ``scoring="pooled"``: cosine of the pooled image embedding with the class embedding (the
  normalised mean of its prompts). ``"late_interaction"``: FILIP's token-wise image→text
  score against every prompt, averaged over a class's prompts (prompt ensembling).
  """
  if scoring not in SCORINGS:
    raise ValueError(f"zero-shot scoring={scoring!r}; expected one of {SCORINGS}.")
  labels = []

  def batches():
    for batch in dataset.batch(batch_size).as_numpy_iterator():
      labels.append(batch["label"])
      yield batch

  if scoring == "pooled":
    weights = classifier(encoders, variables, tokenizer, class_names, templates, mesh, batch_size)
    images = embedding.embed_batches(encoders.image, variables, batches(), ("image",), mesh,
                                     batch_size)
    logits = embedding.normalize(images) @ weights.T
  else:
    text_batches, text_mask = _text_batches(tokenizer, _prompts(class_names, templates),
                                            batch_size)
    prompts = embedding.embed_batches(encoders.text_tokens, variables, text_batches,
                                      ("text", "text_mask"), mesh, batch_size)
    images = embedding.embed_batches(encoders.image_tokens, variables, batches(), ("image",),
                                     mesh, batch_size)
    image_mask = np.ones(images.shape[:2], bool)
    logits = late_interaction.scores(images, image_mask, prompts, text_mask)
    logits = logits.reshape(len(images), len(class_names), len(templates)).mean(axis=2)
  return metrics.classification_metrics(logits, np.concatenate(labels))

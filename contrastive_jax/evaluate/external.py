"""Our checkpoints as plain numpy functions, for external evaluation harnesses.

  from contrastive_jax.evaluate import external
  encode_image, encode_text = external.checkpoint_encoders(config, "/tmp/run/checkpoints")
  image_emb = encode_image(images)            # float [B, H, W, 3], the run's normalisation
  text_emb = encode_text(["a photo of a dog"])  # tokenized with the run's tokenizer

Embeddings are projected, float32 ``[B, E]``, not L2-normalised (as CLIP's
``encode_image`` / ``encode_text``). Imported public CLIP weights have the same pair in
:func:`contrastive_jax.models.clip_import.encoders`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import numpy as np
import tensorflow as tf

from contrastive_jax import train
from contrastive_jax.evaluate import embedding


def checkpoint_encoders(config, checkpoint_dir: str, step: Optional[int] = None
                        ) -> Tuple[Callable[[np.ndarray], np.ndarray],
                                   Callable[[Sequence[str]], np.ndarray]]:
  """``(encode_image, encode_text)`` of a run's checkpoint (newest, or ``step``).

  ``encode_image(images)``: float ``[B, H, W, 3]`` preprocessed like the run's evaluation
  images (``config.data.image_size``, ``config.data.normalization``) -> ``[B, E]``.
  ``encode_text(texts)``: Python strings -> ``[B, E]`` (the run's tokenizer).
  """
  tokenizer, objective, _, variables, _ = train.restore_variables(config, checkpoint_dir, step)
  encoders = embedding.jitted_encoders(objective.model)
  variables = jax.device_get(variables)

  def encode_image(images) -> np.ndarray:
    return np.asarray(encoders.image(variables, np.asarray(images, np.float32)))

  def encode_text(texts: Sequence[str]) -> np.ndarray:
    if tokenizer is None:
      raise ValueError("This run has no text tower (an image-only config).")
    tokens, mask = tokenizer.tokenize(tf.constant(list(texts)))
    return np.asarray(encoders.text(variables, tokens.numpy(), mask.numpy()))

  return encode_image, encode_text

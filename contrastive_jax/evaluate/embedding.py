"""Embedding a dataset with a jitted, batch-sharded encoder over every device (and host)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from contrastive_jax import parallel
from contrastive_jax.data import pipeline


def _host_rows(x: np.ndarray) -> np.ndarray:
  per_host = x.shape[0] // jax.process_count()
  return x[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]


class Encoders(NamedTuple):
  """Jitted encoders of one model: ``image(variables, images) -> [n, E]`` and
  ``text(variables, tokens, mask) -> [n, E]`` pooled embeddings (``variables``: the flax
  variables, ``{"params": ...}`` plus ``batch_stats`` for models with BatchNorm); ``image_tokens`` /
  ``text_tokens`` give L2-normalised token features ``[n, T, E]`` (padded text tokens zeroed)
  for late-interaction scoring. Each compiles on first use only."""
  image: Callable
  text: Callable
  image_tokens: Callable
  text_tokens: Callable


def _normalized_tokens(tokens, mask=None):
  tokens = tokens.astype(jnp.float32)
  tokens = tokens / (jnp.linalg.norm(tokens, axis=-1, keepdims=True) + 1e-8)
  return tokens if mask is None else jnp.where(mask[..., None], tokens, 0.0)


def jitted_encoders(model) -> Encoders:
  """The :class:`Encoders` of ``model`` (``encode_image`` / ``encode_text`` returning
  ``(pooled, tokens)``). Build them once per model and reuse them, so periodic evaluations
  do not recompile."""
  image = lambda variables, images: model.apply(variables, images, method=model.encode_image)
  text = lambda variables, tokens, mask: model.apply(variables, tokens, mask,
                                                     method=model.encode_text)
  return Encoders(
      image=jax.jit(lambda p, x: image(p, x)[0]),
      text=jax.jit(lambda p, t, m: text(p, t, m)[0]),
      image_tokens=jax.jit(lambda p, x: _normalized_tokens(image(p, x)[1])),
      text_tokens=jax.jit(lambda p, t, m: _normalized_tokens(text(p, t, m)[1], m)))


def embed_batches(encode: Callable, variables, batches: Iterable[Mapping[str, np.ndarray]],
                  keys, mesh, batch_size: int) -> np.ndarray:
  """Applies the jitted ``encode(variables, *[batch[k] for k in keys]) -> [n, ...]`` to every
  batch.

  Batches (identical on every host) are padded to ``batch_size`` (a multiple of the device
  count, so every call has the same shapes and compiles once), sharded over the ``data``
  axis, and the valid rows are gathered back to numpy. Batch ``i + 1`` is dispatched before
  batch ``i``'s embeddings are fetched, so the host's copies overlap the devices' work.
  """
  parallel.check_batch_size(batch_size, mesh, key="config.eval.batch_size")
  outs, pending = [], None

  def collect(out, n):
    out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out
    outs.append(np.asarray(out)[:n])

  for batch in batches:
    n = len(batch[keys[0]])
    if n > batch_size:
      raise ValueError(f"Evaluation batch of {n} rows exceeds batch_size={batch_size}.")
    arrays = [np.concatenate([batch[k], np.repeat(batch[k][-1:], batch_size - n, 0)])
              if n < batch_size else batch[k] for k in keys]
    out = encode(variables, *parallel.to_global([_host_rows(a) for a in arrays], mesh))
    if pending is not None:  # fetch the previous batch while this one computes
      collect(*pending)
    pending = (out, n)
  if pending is not None:
    collect(*pending)
  return np.concatenate(outs)


def normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def labelled_image_features(encoders, variables, data_config, mesh, batch_size: int, *,
                            split: str, num_examples=None):
  """``(features [n, D], labels [n])`` of a labelled split of ``data_config.source`` embedded
  with ``encoders.image`` (shapes: single-object scenes only, the ones with a class label)."""
  ds = pipeline.image_eval_dataset(data_config, split=split, num_examples=num_examples,
                                   single_object=data_config.source == "shapes")
  labels = []

  def batches():
    for batch in ds.batch(batch_size).as_numpy_iterator():
      labels.append(batch["label"])
      yield batch

  features = embed_batches(encoders.image, variables, batches(), ("image",), mesh, batch_size)
  return features, np.concatenate(labels)

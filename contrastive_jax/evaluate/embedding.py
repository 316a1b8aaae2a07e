"""Embedding a dataset with a jitted, batch-sharded encoder over every device (and host)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from contrastive_jax import parallel


def _host_rows(x: np.ndarray) -> np.ndarray:
  per_host = x.shape[0] // jax.process_count()
  return x[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]


def jitted_encoders(model) -> Tuple[Callable, Callable]:
  """``(image_fn, text_fn)``: jitted ``(params, images)`` and ``(params, tokens, mask)`` ->
  pooled embeddings. Build them once per model and reuse them, so periodic evaluations do
  not recompile."""
  image = lambda params, images: model.apply({"params": params}, images,
                                             method=model.encode_image)[0]
  text = lambda params, tokens, mask: model.apply({"params": params}, tokens, mask,
                                                  method=model.encode_text)[0]
  return jax.jit(image), jax.jit(text)


def embed_batches(encode: Callable, params, batches: Iterable[Mapping[str, np.ndarray]],
                  keys, mesh, batch_size: int) -> np.ndarray:
  """Applies the jitted ``encode(params, *[batch[k] for k in keys]) -> [n, E]`` to every batch.

  Batches (identical on every host) are padded to ``batch_size`` (a multiple of the device
  count, so every call has the same shapes and compiles once), sharded over the ``data``
  axis, and the valid rows are gathered back to numpy.
  """
  parallel.check_batch_size(batch_size, mesh)
  outs = []
  for batch in batches:
    n = len(batch[keys[0]])
    if n > batch_size:
      raise ValueError(f"Evaluation batch of {n} rows exceeds batch_size={batch_size}.")
    arrays = [np.concatenate([batch[k], np.repeat(batch[k][-1:], batch_size - n, 0)])
              for k in keys]
    out = encode(params, *parallel.to_global([_host_rows(a) for a in arrays], mesh))
    out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out
    outs.append(np.asarray(out)[:n])
  return np.concatenate(outs)


def normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

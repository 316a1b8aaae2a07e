"""Per-host tf.data input: source -> preprocessing -> host-local numpy batches.

Each host builds the dataset for its own rows of every global batch; the trainer turns
them into global ``jax.Array``s (``parallel.to_global``). The *data position* is the number
of steps already consumed: a source that is indexable (shapes) resumes exactly by skipping
to ``start_step * global_batch_size``.

Batch keys (the contract between data and objectives):

===================  ===========================  =============================================
key                  shape / dtype                meaning
===================  ===========================  =============================================
``image``            float32 ``[B, H, W, 3]``     pixels scaled to ``[-1, 1]``
``text``             int32 ``[B, L]``             tokens (``tokenizer.tokenize``)
``text_mask``        bool ``[B, L]``              True on real tokens (EOT included)
``label``            int32 ``[B]``                class label, -1 when undefined
``index``            int64 ``[B]``                example index in its source
``subcaptions``      int32 ``[B, K, L]``          DreamLIP: ``K`` sentences of the long caption
``subcaption_mask``  bool ``[B, K, L]``           True on their real tokens
``views``            float32 ``[B, V, H, W, 3]``  SLIP: ``V`` image-only SimCLR views
``local_views``      float32 ``[B, N, h, w, 3]``  CLIP🚀: ``N`` caption-paired crops
``text_aug``         int32 ``[B, M, L]``          CLIP🚀: ``M`` augmented captions
``text_aug_mask``    bool ``[B, M, L]``           True on their real tokens
===================  ===========================  =============================================

Objectives that need more than one view of an example ask for it in ``config.data``; each
optional block adds its own keys (documented in its module):

* ``config.data.subcaptions``: :mod:`contrastive_jax.data.subcaptions` (DreamLIP);
* ``config.data.views``: :mod:`contrastive_jax.data.augment` (SLIP, CLIP🚀).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from contrastive_jax.data import augment, shapes, subcaptions
from contrastive_jax.data.tokenizers import Tokenizer

# key -> (rank, dtype kind) every objective can ask for; see the table above.
BATCH_SPEC = {
    "image": (4, "f"),
    "text": (2, "i"),
    "text_mask": (2, "b"),
    "label": (1, "i"),
    "index": (1, "i"),
    "subcaptions": (3, "i"),
    "subcaption_mask": (3, "b"),
    "views": (5, "f"),
    "local_views": (5, "f"),
    "text_aug": (3, "i"),
    "text_aug_mask": (3, "b"),
}


def scale_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 ``[..., H, W, 3]`` -> float32 in ``[-1, 1]``."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def image_text_features(tokenizer: Tokenizer, text_key: str = "caption"):
  """Preprocessing of one shapes-like example into the batch keys above."""

  def fn(example):
    if text_key not in example:
      raise KeyError(f"config.data.text_key={text_key!r} is not a feature of the source; "
                     f"available: {sorted(example)}.")
    text, mask = tokenizer.tokenize(example[text_key])
    return {"image": scale_image(example["image"]), "text": text, "text_mask": mask,
            "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int64)}

  return fn


def extra_feature_fns(data_config: Mapping[str, Any], tokenizer: Tokenizer) -> list:
  """The optional per-example feature functions ``config.data`` asks for (see the module
  docstring); each maps a raw source example to a dict of extra batch keys."""
  fns = []
  if data_config.get("subcaptions"):
    fns.append(subcaptions.subcaption_features(tokenizer, seed=data_config.get("seed", 0),
                                               **data_config.subcaptions))
  if data_config.get("views"):
    fns.append(augment.view_features(tokenizer, seed=data_config.get("seed", 0),
                                     **data_config.views))
  return fns


def training_features(data_config: Mapping[str, Any], tokenizer: Tokenizer):
  """``image_text_features`` plus the extra keys of :func:`extra_feature_fns`."""
  base = image_text_features(tokenizer, data_config.get("text_key", "caption"))
  extras = extra_feature_fns(data_config, tokenizer)

  def fn(example):
    out = base(example)
    for extra in extras:
      out.update(extra(example))
    return out

  return fn


def _shapes_kwargs(data_config: Mapping[str, Any]) -> dict:
  return dict(seed=data_config.get("seed", 0), image_size=data_config.image_size,
              min_objects=data_config.min_objects, max_objects=data_config.max_objects)


def host_example_indices(start_step: int, global_batch_size: int) -> tf.data.Dataset:
  """Global example indices of this host's rows, step after step, from ``start_step``.

  Step ``t`` covers indices ``[t·B, (t+1)·B)``; host ``p`` of ``P`` takes rows
  ``[p·B/P, (p+1)·B/P)`` of each step, so hosts never read the same example.
  """
  per_host = global_batch_size // jax.process_count()
  offset = jax.process_index() * per_host

  def to_global(j):
    return (j // per_host) * global_batch_size + offset + j % per_host

  return tf.data.Dataset.range(start_step * per_host, np.iinfo(np.int64).max).map(to_global)


def train_dataset(config, tokenizer: Tokenizer, *, start_step: int = 0) -> tf.data.Dataset:
  """This host's batches of the training data, resumed at ``start_step``."""
  data = config.data
  if data.source != "shapes":
    raise ValueError(f"config.data.source={data.source!r}; known sources: ['shapes'].")
  kwargs = _shapes_kwargs(data)
  per_host = config.batch_size // jax.process_count()
  ds = host_example_indices(start_step, config.batch_size)
  ds = ds.map(shapes.example_fn("train", **kwargs), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.map(training_features(data, tokenizer), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(data_config, tokenizer: Tokenizer, *, split: str = "test",
                 single_object: bool = False, num_examples: Optional[int] = None,
                 text_key: str = "caption") -> tf.data.Dataset:
  """Unbatched, preprocessed evaluation examples (the same on every host).

  The split is the dataset's canonical one (1 to ``MAX_OBJECTS`` objects per scene), so
  the test scenes do not change with the training data's object range; only the seed and
  image size follow ``data_config``.
  """
  ds = shapes.dataset(split, seed=data_config.get("seed", 0), image_size=data_config.image_size,
                      num_examples=num_examples)
  if single_object:
    ds = ds.filter(lambda ex: ex["label"] >= 0)
  return ds.map(image_text_features(tokenizer, text_key), num_parallel_calls=tf.data.AUTOTUNE)


def as_numpy_batches(ds: tf.data.Dataset) -> Iterator[dict]:
  return iter(ds.as_numpy_iterator())


def validate_batch(batch: Mapping[str, np.ndarray], required: Sequence[str],
                   local_batch_size: int) -> None:
  """Checks that ``batch`` has the keys an objective needs, with the documented ranks.

  Raises:
    ValueError naming the missing or misshapen key.
  """
  missing = [k for k in required if k not in batch]
  if missing:
    raise ValueError(f"The objective needs batch keys {list(required)} but the input pipeline "
                     f"does not provide {missing}; it provides {sorted(batch)}.")
  for key in required:
    value = np.asarray(batch[key])
    rank, kind = BATCH_SPEC.get(key, (None, None))
    if value.shape[:1] != (local_batch_size,):
      raise ValueError(f"Batch key {key!r} has shape {value.shape}; expected leading "
                       f"dimension {local_batch_size} (this host's rows).")
    if rank is not None and (value.ndim != rank or value.dtype.kind != kind):
      raise ValueError(f"Batch key {key!r} has shape {value.shape} and dtype {value.dtype}; "
                       f"expected rank {rank} and dtype kind {kind!r}.")


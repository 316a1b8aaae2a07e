"""TFDS datasets by name and split, read without ever downloading.

``config.data``: ``source="tfds"``, ``name`` (``cifar10``, ``imagenet2012``,
``coco_captions``, ...), ``split`` (any TFDS split string, slicing included:
``"train[:90%]"``), ``data_dir`` (None: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``),
``image_key`` (default ``"image"``), ``label_key`` (default ``"label"`` when the dataset has
it; None: no label) and
``caption_key`` (default: :data:`CAPTION_KEYS` for the dataset, e.g. ``"captions/text"`` for
``coco_captions``; None: an image-only dataset). A nested feature is named with ``/``.

Images are read encoded (``tfds.decode.SkipDecoding``) and decoded by :mod:`streams`, so a
training crop of a JPEG decodes only its window. Each host reads its even part of the split
(``tfds.split_for_jax_process``), files in their stored order (TFDS shuffles examples when it
prepares a dataset); :mod:`records` shuffles within windows, differently every epoch.
A record's ``index`` is the fingerprint of its ``tfds_id``.

A dataset that is not prepared under the data directory is an error that says how to prepare
it; training never calls ``download_and_prepare``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from contrastive_jax.data import streams

# Datasets whose examples carry several captions (a sequence feature).
CAPTION_KEYS = {"coco_captions": "captions/text"}


def _feature(example, key: str):
  value = example
  for part in key.split("/"):
    if part not in value:
      raise KeyError(f"TFDS feature {key!r} not found; the example has {sorted(value)}.")
    value = value[part]
  return value


def caption_key_of(data_config: Mapping[str, Any]) -> Optional[str]:
  if "caption_key" in data_config:
    return data_config.caption_key
  return CAPTION_KEYS.get(data_config.name)


def builder(data_config: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  """The dataset's builder (nothing is downloaded or prepared)."""
  name = data_config.get("name")
  if not name:
    raise ValueError("config.data.name is required for source='tfds' (e.g. 'cifar10').")
  try:
    return tfds.builder(name, data_dir=data_config.get("data_dir"))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.name={name!r} is not a TFDS dataset: {e}") from None


def _not_prepared(name: str, b, error: Exception) -> FileNotFoundError:
  return FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared under {b.data_dir!r} ({error}). Training never "
      f"downloads: prepare it once, e.g. `tfds build {name} --data_dir=DIR` (datasets with "
      f"manual downloads, like imagenet2012, also need --manual_dir), then point "
      f"config.data.data_dir or $TFDS_DATA_DIR at DIR.")


def as_dataset(data_config: Mapping[str, Any], split, *, shuffle_files: bool = False):
  """``builder.as_dataset`` with encoded images and ``tfds_id``s, deterministic order."""
  b = builder(data_config)
  read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False, skip_prefetch=True,
                                shuffle_seed=int(data_config.get("seed", 0)))
  decoders = {data_config.get("image_key", "image"): tfds.decode.SkipDecoding()}
  try:
    return b.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                        read_config=read_config)
  except (AssertionError, FileNotFoundError) as e:
    raise _not_prepared(data_config.name, b, e) from None


def raw_fn(data_config: Mapping[str, Any]):
  """``TFDS example -> raw record`` of :mod:`streams` (fixed shapes, so windows batch it)."""
  image_key = data_config.get("image_key", "image")
  label_key = data_config.get("label_key", "label")
  caption_key = caption_key_of(data_config)

  def fn(example):
    # The default label key is optional (caption datasets have none); a configured one not.
    has_label = label_key and ("label_key" in data_config or label_key in example)
    raw = {"image": _feature(example, image_key),
           "index": tf.strings.to_hash_bucket_fast(example["tfds_id"], 1 << 62),
           "label": (tf.cast(_feature(example, label_key), tf.int64) if has_label
                     else tf.constant(-1, tf.int64))}
    if caption_key:
      captions = tf.reshape(_feature(example, caption_key), [-1])
      raw.update(text=tf.strings.reduce_join(captions, separator=streams.CAPTION_SEPARATOR),
                 has_text=tf.size(captions) > 0)
    else:
      raw.update(text=tf.constant(""), has_text=tf.constant(False))
    return raw

  return fn


def epoch_fn(data_config: Mapping[str, Any], process_index: int, process_count: int):
  """``epoch -> this host's raw records`` (its even part of ``config.data.split``)."""
  split = tfds.split_for_jax_process(data_config.get("split", "train"),
                                     process_index=process_index, process_count=process_count)
  records = as_dataset(data_config, split).map(raw_fn(data_config),
                                                num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True)
  return lambda epoch: records


def eval_records(data_config: Mapping[str, Any], split: str) -> tf.data.Dataset:
  """All raw records of ``split`` in a fixed order (the same on every host)."""
  return as_dataset(data_config, split).map(raw_fn(data_config),
                                            num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)

"""Shards with planted bad records, and TFDS mocks with the real feature specs (tests only)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

GOOD_PER_SHARD = 10
NUM_SHARDS = 4
# Planted in shard 1: (reason, feature dict maker). Counted as (name, expected count).
BAD_COUNTS = {"undecodable": 2, "missing_feature": 2, "empty_caption": 1, "bad_utf8": 1}
CONVERTED_COUNT = 2


def colour(i: int) -> np.ndarray:
  """The solid colour of good record ``i`` (recoverable from any crop of it)."""
  return np.array([(i * 37) % 256, (i * 91 + 40) % 256, (i * 13 + 200) % 256], np.uint8)


def record_of(image_colour) -> int:
  """Inverse of :func:`colour` for a (possibly cropped, resized) uint8 image."""
  mean = np.asarray(image_colour, np.float64).reshape(-1, 3).mean(0)
  table = np.stack([colour(i) for i in range(NUM_SHARDS * GOOD_PER_SHARD)]).astype(np.float64)
  return int(np.argmin(np.abs(table - mean).sum(1)))


def _jpeg(pixels: np.ndarray) -> bytes:
  return tf.io.encode_jpeg(tf.constant(pixels), quality=95).numpy()


def _example(**features) -> bytes:
  feature = {}
  for key, value in features.items():
    if isinstance(value, int):
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    else:
      value = value.encode() if isinstance(value, str) else value
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def good_record(i: int, *, height: int = 30, width: int = 40) -> bytes:
  pixels = np.broadcast_to(colour(i), (height, width, 3)).copy()
  return _example(key=f"{i:06d}", jpg=_jpeg(pixels), txt=f"caption number {i}")


def bad_records() -> list:
  """Bad and convertible records, each labelled with what the pipeline must do with it."""
  good = _jpeg(np.full((30, 40, 3), 128, np.uint8))
  gray = tf.io.encode_jpeg(tf.fill([30, 40, 1], tf.constant(90, tf.uint8))).numpy()
  rgba = tf.io.encode_png(tf.fill([30, 40, 4], tf.constant(60, tf.uint8))).numpy()
  return [
      ("undecodable", _example(jpg=good[: len(good) // 2], txt="truncated jpeg")),
      ("undecodable", _example(jpg=b"not an image at all", txt="garbage bytes")),
      ("missing_feature", _example(txt="no image")),
      ("missing_feature", _example(jpg=good)),
      ("empty_caption", _example(jpg=good, txt="   ")),
      ("bad_utf8", _example(jpg=good, txt=b"caf\xff\xfe")),
      ("converted", _example(jpg=gray, txt="a gray image")),
      ("converted", _example(jpg=rgba, txt="an rgba image")),
  ]


def write_shards(directory: str) -> dict:
  """``NUM_SHARDS`` shards of ``GOOD_PER_SHARD`` good records (good record ``i`` is in shard
  ``i // GOOD_PER_SHARD``); shard 1 also holds :func:`bad_records`, interleaved. Returns
  ``{"pattern", "good": set of good captions, "converted": set of converted captions}``."""
  os.makedirs(directory, exist_ok=True)
  bad = bad_records()
  for shard in range(NUM_SHARDS):
    with tf.io.TFRecordWriter(os.path.join(directory, f"{shard:05d}.tfrecord")) as writer:
      for j in range(GOOD_PER_SHARD):
        writer.write(good_record(shard * GOOD_PER_SHARD + j))
        if shard == 1 and j < len(bad):
          writer.write(bad[j][1])
  return {"pattern": os.path.join(directory, "*.tfrecord"),
          "good": {f"caption number {i}" for i in range(NUM_SHARDS * GOOD_PER_SHARD)},
          "converted": {"a gray image", "an rgba image"}}


# ---------------------------------------------------------------- TFDS with real feature specs

def _tfds_example(name: str, split: str, i: int) -> dict:
  rng = np.random.default_rng(i)
  shape = (32, 32, 3) if name.startswith("cifar") else (24, 32, 3)
  pixels = np.broadcast_to(colour(i % 40), shape).copy()
  if name == "coco_captions":
    return {"image": pixels, "image/filename": f"{i}.jpg", "image/id": i,
            "objects": {"area": np.zeros([0], np.int64), "bbox": np.zeros([0, 4], np.float32),
                        "id": np.zeros([0], np.int64), "is_crowd": np.zeros([0], bool),
                        "label": np.zeros([0], np.int64)},
            "captions": [{"id": 10 * i + k, "text": f"image {i} caption {k}"}
                         for k in range(3 + i % 3)]}
  example = {"image": pixels, "label": int(rng.integers(10))}
  if name == "imagenet2012":
    example["file_name"] = f"{split}_{i}.JPEG"
  else:
    example["id"] = f"{split}_{i}"
  return example


def _fake_dataset(builder, split, decoders, read_config, split_sizes: dict):
  """``builder.as_dataset`` of made-up examples encoded and decoded with the builder's real
  feature spec, honouring split slicing (even host splits) and ``SkipDecoding``."""
  from tensorflow_datasets.core import splits as splits_lib
  infos = splits_lib.SplitDict([
      splits_lib.SplitInfo(name=n, shard_lengths=[k], num_bytes=0)
      for n, k in split_sizes.items()])
  features = builder.info.features
  serialized, ids = [], []
  for inst in splits_lib.AbstractSplit.from_spec(split).to_absolute(infos):
    end = inst.to if inst.to is not None else split_sizes[inst.splitname]
    for i in range(inst.from_ or 0, end):
      serialized.append(features.serialize_example(
          features.encode_example(_tfds_example(builder.name, inst.splitname, i))))
      ids.append(f"{builder.name}-{inst.splitname}.tfrecord-00000-of-00001__{i}")
  ds = tf.data.Dataset.from_tensor_slices((serialized, ids))

  def decode(s, tfds_id):
    example = features.deserialize_example(s, decoders=decoders)
    if read_config is not None and read_config.add_tfds_id:
      example["tfds_id"] = tfds_id
    return example

  return ds.map(decode)


def mock_tfds(split_sizes: dict):
  """``tfds.testing.mock_data`` serving :func:`_fake_dataset`."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del shuffle_files, kwargs
    return _fake_dataset(self, split, decoders, read_config, split_sizes)

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def patch_tfds(monkeypatch, split_sizes: dict) -> None:
  """The same fake examples through ``tfds_source.as_dataset`` itself, for tests that also
  write orbax checkpoints: ``mock_data`` swaps the process-wide file system while it builds
  a dataset, which orbax's background threads can see."""
  from contrastive_jax.data import tfds_source

  def as_dataset(data_config, split, *, shuffle_files=False):
    del shuffle_files
    builder = tfds.builder(data_config.name)
    decoders = {data_config.get("image_key", "image"): tfds.decode.SkipDecoding()}
    return _fake_dataset(builder, split, decoders, tfds.ReadConfig(add_tfds_id=True),
                         split_sizes)

  monkeypatch.setattr(tfds_source, "as_dataset", as_dataset)

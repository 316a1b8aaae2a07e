"""Image-text TFRecord shards in the img2dataset layout (``make_shards`` writes them too).

Each record is a ``tf.train.Example`` with bytes features ``jpg`` (the encoded image; any
format :mod:`image_ops` decodes) and ``txt`` (the UTF-8 caption), plus ``key`` and metadata
that are ignored. ``config.data.image_key`` / ``text_key`` name other features.

``config.data.shards`` is a glob (or several, comma-separated), local or ``gs://`` (read
through ``tf.io.gfile``). The sorted file list is split *by file* across hosts (host ``p``
of ``P`` reads files ``p, p + P, ...``), so hosts never share a record; every epoch each host
reads its files in a fresh stateless order, interleaving ``config.data.cycle_length`` files at
a time. A record's ``index`` is a stable 63-bit id: the fingerprint of its file's basename
and record number.

A shard file that is itself corrupt (a truncated TFRecord) stops at the damage with a logged
warning; its later records cannot be located, so they are not counted per record.
"""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Sequence

import tensorflow as tf

from contrastive_jax.data import fashion_mnist, streams

_STREAM = 0x5AA_0005


def list_files(patterns: str) -> List[str]:
  """Sorted files matching ``patterns`` (comma-separated globs).

  Raises:
    FileNotFoundError naming the pattern that matches nothing.
  """
  if not patterns:
    raise ValueError("config.data.shards is empty; give a glob of TFRecord files, e.g. "
                     "'/data/cc3m/*.tfrecord' or 'gs://bucket/laion/{00000..00099}.tfrecord'.")
  files = []
  for pattern in str(patterns).split(","):
    matched = tf.io.gfile.glob(pattern.strip())
    if not matched:
      raise FileNotFoundError(f"config.data.shards: {pattern.strip()!r} matches no files.")
    files.extend(matched)
  return sorted(set(files))


def host_files(files: Sequence[str], process_index: int, process_count: int) -> List[str]:
  """This host's files: every ``process_count``-th, starting at ``process_index``."""
  if len(files) < process_count:
    raise ValueError(f"{len(files)} shard files for {process_count} hosts: every host needs at "
                     f"least one file (files are split across hosts, not records); write more, "
                     f"smaller shards (make_shards --examples_per_shard).")
  return list(files[process_index::process_count])


def epoch_fn(files: Sequence[str], *, seed: int, cycle_length: int = 16):
  """``epoch -> dataset of {"record": serialized Example, "index": int64}`` over ``files``.

  Each epoch reads the files in a stateless permutation keyed by ``(seed, epoch)``, ``cycle
  length`` of them interleaved record by record, deterministically.
  """
  files_t = tf.constant(list(files))
  # One vectorised op (not one eager op per file: pods read 10⁵ shards).
  ids_t = tf.strings.to_hash_bucket_fast(tf.constant([os.path.basename(f) for f in files]),
                                         1 << 31)
  n = len(files)
  cycle = max(1, min(cycle_length, n))

  def read(i):
    def keyed(j, record):
      return {"record": record, "index": ids_t[i] * (1 << 32) + j}

    ds = tf.data.TFRecordDataset(files_t[i]).ignore_errors(log_warning=True)
    return ds.enumerate().map(keyed)

  def fn(epoch):
    order = tf.random.experimental.index_shuffle(
        tf.range(n, dtype=tf.int64),
        fashion_mnist.epoch_seed(seed ^ _STREAM, epoch), tf.constant(n - 1, tf.int64))
    return tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=cycle, block_length=1, num_parallel_calls=cycle, deterministic=True)

  return fn


def parse_fn(data_config: Mapping[str, Any], *, label: int = -1):
  """``{"record", "index", positions...} -> raw record`` of :mod:`streams` (may raise on a
  record that is not a parsable Example; the pipeline counts it as undecodable)."""
  image_key = data_config.get("image_key", "jpg")
  text_key = data_config.get("text_key", "txt")
  spec = {image_key: tf.io.VarLenFeature(tf.string), text_key: tf.io.VarLenFeature(tf.string)}

  def fn(rec):
    parsed = tf.io.parse_single_example(rec["record"], spec)
    image = tf.sparse.to_dense(parsed[image_key], default_value="")
    text = tf.sparse.to_dense(parsed[text_key], default_value="")
    raw = {k: v for k, v in rec.items() if k != "record"}
    raw.update(image=tf.cond(tf.size(image) > 0, lambda: image[0], lambda: tf.constant("")),
               text=tf.strings.reduce_join(text, separator=streams.CAPTION_SEPARATOR),
               has_text=tf.size(text) > 0, label=tf.constant(label, tf.int64))
    return raw

  return fn

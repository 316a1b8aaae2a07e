"""Record streams that resume exactly and count what they skip.

A *stream* source (TFRecord shards, TFDS) is read as an endless sequence of epochs. Each
epoch is a deterministic order of this host's raw records (``epoch_fn(epoch)``), shuffled in
windows of ``window`` records by a stateless permutation keyed by ``(seed, epoch, window)``.
Every record carries its **position** ``(_epoch, _offset)``: the epoch and its place in that
epoch's shuffled order. Resuming at a position rebuilds exactly the same sequence from there:
whole windows before it are skipped *before* parsing or decoding (cheap), the rest inside its
window after the shuffle. Nothing about the sequence depends on how far the run got, on
timing, or on parallelism (every map is deterministic).

Bad records are never fatal and never silently dropped. A preprocessing function returns a
``_status`` code per record (:data:`REASONS`: 0 is good); records whose preprocessing *raised*
(undecodable or truncated images) are dropped by ``ignore_errors`` and found again as gaps in
the run-local sequence number ``_seq``. :func:`count_and_filter` turns both into cumulative
per-reason counters (``_skipped``, int64 ``[len(REASONS)]``) carried by every good record,
then drops the bad ones. The trainer reads the last row of a batch (:func:`host_state`) to
checkpoint the position and report the counters.

Underscore keys are bookkeeping for the trainer; :func:`pop_bookkeeping` removes them before
a batch reaches the device.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

# _status codes of a preprocessed record; the counter of reason i is _skipped[i].
REASONS = ("ok", "undecodable", "missing_feature", "empty_caption", "bad_utf8", "non_rgb")
STATUS = {name: i for i, name in enumerate(REASONS)}
# Counted but kept: grayscale / RGBA / CMYK images converted to RGB (config.data.non_rgb).
CONVERTED = "converted_non_rgb"
_INT64_MAX = np.iinfo(np.int64).max
_ALG = "philox"
_STREAM = 0x5EC_0005  # separates the window permutations from other streams of the same seed


def initial_state() -> Dict[str, Any]:
  """The data state of a run that starts at the beginning: epoch 0, offset 0, no counts."""
  return {"epoch": 0, "offset": 0, "counts": {name: 0 for name in REASONS[1:] + (CONVERTED,)}}


def window_seed(seed: int, epoch, window) -> tf.Tensor:
  """Stateless seed ``[2]`` of one window's permutation."""
  key = tf.constant([seed, _STREAM], tf.int64)
  for data in (epoch, window):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)
  return key


def positioned_stream(epoch_fn: Callable[[tf.Tensor], tf.data.Dataset], *, seed: int,
                      window: int, start_epoch: int = 0,
                      start_offset: int = 0) -> tf.data.Dataset:
  """Endless epochs of ``epoch_fn``'s records, window-shuffled, with their positions.

  Args:
    epoch_fn: ``int64 epoch tensor -> tf.data.Dataset`` of this host's raw records (dicts of
      fixed-shape tensors) in a deterministic order; it may use the epoch (e.g. to permute
      files). It must not be empty.
    seed: the data seed.
    window: records per shuffle window (1: no shuffle). Memory: ``window`` raw records.
    start_epoch, start_offset: where to start (a position saved by :func:`host_state`).

  Returns:
    Records with added int64 ``_epoch``, ``_offset`` (position in the epoch's shuffled order)
    and ``_seq`` (0, 1, 2, ... from the start of this stream; see :func:`count_and_filter`).
  """
  if window < 1:
    raise ValueError(f"config.data.shuffle_window={window}; expected >= 1.")
  e0 = tf.constant(start_epoch, tf.int64)
  o0 = tf.constant(start_offset, tf.int64)

  def one_epoch(epoch):
    first = tf.equal(epoch, e0)
    skip_windows = tf.where(first, o0 // window, 0)
    skip_inside = tf.where(first, o0 % window, 0)
    records = epoch_fn(epoch).skip(skip_windows * window).batch(window)
    windows = tf.data.Dataset.zip(tf.data.Dataset.range(skip_windows, _INT64_MAX), records)

    def shuffle(w, rows):
      n = tf.shape(tf.nest.flatten(rows)[0], out_type=tf.int64)[0]
      if window == 1:
        order = tf.range(n)
      else:
        order = tf.random.experimental.index_shuffle(tf.range(n), window_seed(seed, epoch, w),
                                                     n - 1)
      rows = tf.nest.map_structure(lambda x: tf.gather(x, order), rows)
      rows = dict(rows, _epoch=tf.fill([n], epoch), _offset=w * window + tf.range(n))
      return tf.data.Dataset.from_tensor_slices(rows)

    return windows.flat_map(shuffle).skip(skip_inside)

  stream = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(one_epoch)
  return stream.enumerate().map(lambda seq, rec: dict(rec, _seq=seq))


def count_and_filter(ds: tf.data.Dataset, counts: Optional[Mapping[str, int]] = None
                     ) -> tf.data.Dataset:
  """Drops bad records and attaches cumulative per-reason counts to the good ones.

  ``ds``: preprocessed records with int32 ``_status`` (:data:`STATUS`), bool ``_converted``
  and the ``_seq`` of :func:`positioned_stream`, after ``ignore_errors`` (records whose
  preprocessing raised are missing: each gap in ``_seq`` counts as ``undecodable``).
  ``counts``: the counts carried over from a resumed run. Undecodable records are
  ``(largest _seq seen + 1) − records seen``: exact at every record when the maps are
  deterministic (the default), exact once the stream settles otherwise.

  Returns good records with ``_skipped`` (int64 ``[len(REASONS)]``, index 0 unused) and
  ``_converted_count`` (int64), counts of everything read so far, this record included.
  """
  counts = dict(initial_state()["counts"], **(counts or {}))
  start = tf.constant([0] + [counts[name] for name in REASONS[1:]], tf.int64)
  undecodable = tf.one_hot(STATUS["undecodable"], len(REASONS), dtype=tf.int64)

  def step(state, rec):
    flagged, converted, seen, max_seq = state
    status = tf.cast(rec["_status"], tf.int64)
    flagged = flagged + tf.where(status > 0, tf.one_hot(status, len(REASONS), dtype=tf.int64),
                                 tf.zeros([len(REASONS)], tf.int64))
    converted = converted + tf.cast(rec["_converted"], tf.int64)
    seen, max_seq = seen + 1, tf.maximum(max_seq, rec["_seq"])
    # Records read but never seen here raised in preprocessing. In order (deterministic
    # maps) this is exact at every record; out of order it is exact once the stream settles.
    skipped = flagged + (max_seq + 1 - seen) * undecodable
    out = dict(rec, _skipped=skipped, _converted_count=converted)
    return (flagged, converted, seen, max_seq), out

  zero = tf.constant(0, tf.int64)
  init = (start, tf.constant(counts[CONVERTED], tf.int64), zero, tf.constant(-1, tf.int64))
  ds = ds.scan(init, step)
  ds = ds.filter(lambda rec: tf.equal(rec["_status"], 0))
  return ds.map(lambda rec: {k: v for k, v in rec.items()
                             if k not in ("_status", "_converted", "_seq")})


def host_state(batch: Mapping[str, np.ndarray]) -> Optional[Dict[str, Any]]:
  """The data state after ``batch`` (a host batch of a stream source): the position of the
  next unread record and the counters. None for index-based sources (no ``_epoch`` key)."""
  if "_epoch" not in batch:
    return None
  skipped = np.asarray(batch["_skipped"])[-1]
  counts = {name: int(skipped[i]) for i, name in enumerate(REASONS) if i}
  counts[CONVERTED] = int(np.asarray(batch["_converted_count"])[-1])
  return {"epoch": int(batch["_epoch"][-1]), "offset": int(batch["_offset"][-1]) + 1,
          "counts": counts}


def pop_bookkeeping(batch: Mapping[str, np.ndarray]) -> Tuple[dict, dict]:
  """``(device batch, bookkeeping)``: keys starting with ``_`` go to the second dict."""
  device = {k: v for k, v in batch.items() if not k.startswith("_")}
  return device, {k: v for k, v in batch.items() if k.startswith("_")}


def decode_or_placeholder(status: tf.Tensor, decode: Callable[[], tf.Tensor],
                          placeholder_shape) -> tf.Tensor:
  """``decode()`` for good records, zeros of ``placeholder_shape`` (never used: the record is
  dropped) for records already known to be bad, so their bytes are never decoded."""
  return tf.cond(tf.equal(status, 0), decode,
                 lambda: tf.zeros(placeholder_shape, tf.uint8))

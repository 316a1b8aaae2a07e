"""Stream sources (TFRecord shards, TFDS): raw records -> checked, decoded examples.

A stream source gives :func:`records.positioned_stream` an ``epoch_fn`` of *raw* records::

  {"image": tf.string (encoded JPEG/PNG/...; "" when missing),
   "text": tf.string (captions joined by CAPTION_SEPARATOR; "" when the record has none),
   "has_text": bool (the caption feature exists), "label": int64 (-1: none),
   "index": int64 (a stable id of the record in its source)}

and this module turns each into the example :mod:`pipeline` preprocesses (``image`` uint8
``[S, S, 3]``, ``caption``, ``label``, ``index``, ``position``) plus the bookkeeping of
:mod:`records`. Checks run before decoding, so a known-bad record is never decoded:

* ``missing_feature``: no image bytes, or no caption where the objective needs text;
* ``bad_utf8``: the caption is not valid UTF-8; ``empty_caption``: it is blank;
* ``non_rgb``: a grayscale / gray+alpha / RGBA / CMYK image when ``config.data.non_rgb`` is
  ``"skip"``; with the default ``"convert"`` it is converted to RGB and counted in
  ``converted_non_rgb``;
* ``undecodable``: an unknown format, or a decoder error (truncated or corrupt bytes; the
  record is dropped by ``ignore_errors`` and counted from the gap it leaves).

Training examples get a random resized crop (``config.data.crop_scale``, ``crop_ratio``;
decoded with ``decode_and_crop_jpeg``, so only the crop window of a JPEG is decoded; resized
bilinearly without antialiasing unless ``config.data.antialias``, as big_vision's inception
crop: antialiasing costs ~40 % of the throughput), an optional flip (``config.data.flip``)
and one caption drawn uniformly among the record's non-empty captions; all draws are keyed
by the record's position, so a resumed run repeats them. Evaluation examples are resized and
centre-cropped and keep every caption.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import tensorflow as tf

from contrastive_jax.data import image_ops, records

CAPTION_SEPARATOR = "\x1e"  # ASCII record separator: joins a record's captions in one string
NON_RGB = ("convert", "skip")
_ALG = "philox"
_STREAM = 0x57E_0005


def record_seed(seed: int, epoch, offset) -> tf.Tensor:
  """Stateless seed ``[2]`` of one record's draws (crop, flip, caption)."""
  key = tf.constant([seed, _STREAM], tf.int64)
  for data in (epoch, offset):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)
  return key


def position_key(epoch, offset) -> tf.Tensor:
  """One int64 per record read (``epoch · 2⁴⁰ + offset``): keys view augmentations, which
  therefore change every epoch."""
  return tf.cast(epoch, tf.int64) * (1 << 40) + tf.cast(offset, tf.int64)


def _valid_utf8(text: tf.Tensor) -> tf.Tensor:
  cleaned = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore")
  return tf.equal(tf.strings.length(cleaned), tf.strings.length(text))


def _split_captions(text: tf.Tensor) -> tf.Tensor:
  """The non-blank captions of a joined caption string (``[n]``, possibly empty)."""
  captions = tf.strings.split(text, CAPTION_SEPARATOR)
  return tf.boolean_mask(captions, tf.strings.length(tf.strings.strip(captions)) > 0)


def _status(raw, needs_text: bool, non_rgb: str):
  """``(int32 status, bool converted, int32 channels)`` of a raw record, without decoding."""
  status = records.STATUS
  missing = tf.equal(tf.strings.length(raw["image"]), 0)
  if needs_text:
    missing = missing | tf.logical_not(raw["has_text"])
  bad_utf8 = tf.logical_not(_valid_utf8(raw["text"])) if needs_text else tf.constant(False)
  empty = (tf.equal(tf.size(_split_captions(raw["text"])), 0) if needs_text
           else tf.constant(False))
  unknown = tf.equal(image_ops.image_format(raw["image"]), 0)
  # Channels are read from the header only for records that passed the cheaper checks.
  channels = tf.cond(missing | unknown, lambda: tf.constant(3, tf.int32),
                     lambda: tf.cast(image_ops.native_channels(raw["image"]), tf.int32))
  non_rgb_image = tf.logical_and(tf.not_equal(channels, 3), tf.not_equal(channels, -1))
  code = tf.constant(0, tf.int32)
  # The first failing check wins (checked in this order).
  for bad, name in ((missing, "missing_feature"), (bad_utf8, "bad_utf8"),
                    (empty, "empty_caption"), (unknown, "undecodable"),
                    (non_rgb_image & (non_rgb == "skip"), "non_rgb")):
    code = tf.where(tf.equal(code, 0) & bad, tf.constant(status[name], tf.int32), code)
  converted = tf.equal(code, 0) & non_rgb_image
  return code, converted


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _choose_caption(text: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  captions = _split_captions(text)
  n = tf.maximum(tf.size(captions), 1)
  pick = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(key, 1),
                                     maxval=n, dtype=tf.int32)
  return tf.cond(tf.size(captions) > 0, lambda: tf.gather(captions, pick),
                 lambda: tf.constant(""))


def non_rgb_of(data_config: Mapping[str, Any]) -> str:
  mode = data_config.get("non_rgb", "convert")
  if mode not in NON_RGB:
    raise ValueError(f"config.data.non_rgb={mode!r}; expected one of {NON_RGB}.")
  return mode


def train_record_fn(data_config: Mapping[str, Any], *, needs_text: bool) -> Callable:
  """``raw record (+ positions) -> training example + _status / _converted`` (may raise on
  undecodable images: run it under ``ignore_errors``)."""
  size = int(data_config.image_size)
  seed = int(data_config.get("seed", 0))
  scale = tuple(data_config.get("crop_scale", (0.9, 1.0)))
  ratio = tuple(data_config.get("crop_ratio", (3 / 4, 4 / 3)))
  flip = bool(data_config.get("flip", False))
  antialias = bool(data_config.get("antialias", False))
  non_rgb = non_rgb_of(data_config)

  def fn(raw):
    status, converted = _status(raw, needs_text, non_rgb)
    key = record_seed(seed, raw["_epoch"], raw["_offset"])

    def decode():
      crop_key = tf.random.experimental.stateless_fold_in(key, 0)
      image = image_ops.random_resized_crop(raw["image"], size, crop_key, scale=scale,
                                            ratio=ratio, antialias=antialias)
      if flip:
        image = image_ops.random_flip(image, tf.random.experimental.stateless_fold_in(key, 2))
      return _to_uint8(image)

    image = records.decode_or_placeholder(status, decode, [size, size, 3])
    image = tf.ensure_shape(image, [size, size, 3])
    example = {"image": image, "label": tf.cast(raw["label"], tf.int32),
               "index": tf.cast(raw["index"], tf.int64),
               "position": position_key(raw["_epoch"], raw["_offset"]),
               "_status": status, "_converted": converted, "_seq": raw["_seq"],
               "_epoch": raw["_epoch"], "_offset": raw["_offset"]}
    if needs_text:
      example["caption"] = _choose_caption(raw["text"], key)
    return example

  return fn


def eval_record_fn(data_config: Mapping[str, Any], *, num_captions: int = 0) -> Callable:
  """``raw record -> evaluation example + _status`` (resize + centre crop; with
  ``num_captions``: ``captions`` string ``[num_captions]``, the record's first non-blank
  captions padded with "", and ``caption_valid`` bool ``[num_captions]``)."""
  size = int(data_config.image_size)
  non_rgb = non_rgb_of(data_config)

  def fn(raw):
    status, converted = _status(raw, num_captions > 0, non_rgb)

    def decode():
      return _to_uint8(image_ops.resize_center_crop(raw["image"], size))

    image = tf.ensure_shape(records.decode_or_placeholder(status, decode, [size, size, 3]),
                            [size, size, 3])
    example = {"image": image, "label": tf.cast(raw["label"], tf.int32),
               "index": tf.cast(raw["index"], tf.int64), "_status": status,
               "_converted": converted, "_seq": raw["_seq"]}
    if num_captions:
      captions = _split_captions(raw["text"])[:num_captions]
      valid = tf.range(num_captions) < tf.size(captions)
      pad = tf.fill([num_captions - tf.size(captions)], "")
      example["captions"] = tf.ensure_shape(tf.concat([captions, pad], 0), [num_captions])
      example["caption_valid"] = valid
    return example

  return fn


def process(stream: tf.data.Dataset, record_fn: Callable, *, counts=None,
            deterministic: bool = True) -> tf.data.Dataset:
  """Applies ``record_fn`` in parallel, drops and counts bad records (see :mod:`records`)."""
  ds = stream.map(record_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return records.count_and_filter(ds.ignore_errors(), counts)


def sequenced(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Adds the ``_seq`` numbering to a plain (evaluation) record dataset."""
  return ds.enumerate().map(lambda seq, rec: dict(rec, _seq=seq))

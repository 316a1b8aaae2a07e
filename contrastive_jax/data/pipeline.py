"""Per-host tf.data input: source -> preprocessing -> host-local numpy batches.

Each host builds the dataset for its own rows of every global batch; the trainer turns
them into global ``jax.Array``s (``parallel.to_global``). The *data position* is the number
of steps already consumed: every source is indexable by the global stream position, so a run
resumes exactly by skipping to ``start_step * global_batch_size``.

Sources (``config.data.source``):

* ``"shapes"``: the embedded image-text scenes (:mod:`contrastive_jax.data.shapes`); position
  ``p`` is scene ``p`` (an endless stream of new scenes). Without a tokenizer (image-only
  configs) the batches have ``image`` / ``label`` / ``index`` only.
* ``"fashion_mnist"``: image-only Fashion-MNIST (:mod:`contrastive_jax.data.fashion_mnist`),
  an endless stream of per-epoch stateless permutations of the 60000 training images; batches
  have ``image`` / ``label`` / ``index`` (no text keys). Images are 28 px; another
  ``config.data.image_size`` resizes them (bilinear, antialiased, rounded back to uint8) before
  any other step, so ``image`` and the views all start from the resized image.
  ``config.data.data_dir`` (optional) overrides where the idx files are read.

* ``"shards"`` / ``"tfds"``: record streams (:mod:`contrastive_jax.data.shards`,
  :mod:`contrastive_jax.data.tfds_source`) read through :mod:`contrastive_jax.data.records`
  and :mod:`contrastive_jax.data.streams`: per-host files or even splits, window-shuffled
  epochs, decode + random resized crop, bad records skipped and counted. Their position is
  not a function of the step: batches carry bookkeeping keys (``_epoch``, ``_offset``,
  ``_skipped``, ``_converted_count``) from which the trainer saves each host's position
  (:func:`records.host_state`) and to which it resumes (``data_state``).

``config.data.num_examples`` (optional) makes the training set finite, for methods with
per-example state: scenes ``[0, n)`` of shapes, or the first ``n`` Fashion-MNIST images, read
as a fresh stateless permutation every epoch (``fashion_mnist.shuffled_row``); ``index`` is
then in ``[0, n)``, and augmentations are keyed by the stream position, so they change every
epoch.

Batch keys (the contract between data and objectives):

===================  ===========================  =============================================
key                  shape / dtype                meaning
===================  ===========================  =============================================
``image``            float32 ``[B, H, W, 3]``     pixels in ``[-1, 1]`` (or ``config.data.
                                                  normalization``: ``"clip"``, ``"imagenet"``)
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
``crops``            float32 ``[B, N, s, s, 3]``  SwAV: ``N`` small multi-crop views
``view_boxes``       float32 ``[B, V, 4]``        crop box of each ``views`` entry, ``(x0, y0,
                                                  x1, y1)`` in ``[0, 1]``; ``x0 > x1``: flipped
``target``           float32 ``[B]``              shapes, ``config.data.regression_target``:
                                                  ``shapes.regression_target`` (-1: undefined)
===================  ===========================  =============================================

Objectives that need more than one view of an example ask for it in ``config.data``; each
optional block adds its own keys (documented in its module):

* ``config.data.subcaptions``: :mod:`contrastive_jax.data.subcaptions` (DreamLIP);
* ``config.data.views``: :mod:`contrastive_jax.data.augment` (SLIP, CLIP🚀, SimCLR, SwAV,
  PixPro); image-only sources accept the image groups only.

Image-only evaluation (kNN, linear probe) reads :func:`image_eval_dataset`.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from contrastive_jax.data import (augment, fashion_mnist, image_ops, inflation, records, shapes,
                                  streams, subcaptions, tfds_source)
from contrastive_jax.data import shards as shards_lib
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
    "crops": (5, "f"),
    "view_boxes": (3, "f"),
    "target": (1, "f"),
}
SOURCES = ("shapes", "fashion_mnist", "shards", "tfds")
# Sources read as record streams (positions, bad-record counters; see records.py).
STREAM_SOURCES = ("shards", "tfds")


def scale_image(image: tf.Tensor, normalization: str = "minus_one_to_one") -> tf.Tensor:
  """uint8 ``[..., H, W, 3]`` -> float32 (``config.data.normalization``: ``[-1, 1]`` by
  default, or ``"clip"`` / ``"imagenet"`` mean and std; :func:`image_ops.normalize`)."""
  return image_ops.normalize(tf.cast(image, tf.float32), normalization)


def image_text_features(tokenizer: Tokenizer, text_key: str = "caption",
                        normalization: str = "minus_one_to_one"):
  """Preprocessing of one shapes-like example into the batch keys above."""

  def fn(example):
    if text_key not in example:
      raise KeyError(f"config.data.text_key={text_key!r} is not a feature of the source; "
                     f"available: {sorted(example)}.")
    text, mask = tokenizer.tokenize(example[text_key])
    return {"image": scale_image(example["image"], normalization), "text": text,
            "text_mask": mask, "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int64)}

  return fn


def image_features(normalization: str = "minus_one_to_one"):
  """Preprocessing of one image-only example (``image``, ``label``, ``index``)."""

  def fn(example):
    return {"image": scale_image(example["image"], normalization),
            "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int64)}

  return fn


def source_of(data_config: Mapping[str, Any]) -> str:
  """``config.data.source``, checked against :data:`SOURCES`."""
  source = data_config.get("source", "shapes")
  if source not in SOURCES:
    raise ValueError(f"config.data.source={source!r}; known sources: {list(SOURCES)}.")
  return source


def is_image_only(data_config: Mapping[str, Any]) -> bool:
  """Whether the source's examples have no captions (no text keys, subcaptions or text
  views): Fashion-MNIST, and TFDS datasets without a caption feature."""
  source = source_of(data_config)
  if source == "tfds":
    return tfds_source.caption_key_of(data_config) is None
  return source == "fashion_mnist"


def extra_feature_fns(data_config: Mapping[str, Any], tokenizer: Optional[Tokenizer]) -> list:
  """The optional per-example feature functions ``config.data`` asks for (see the module
  docstring); each maps a raw source example to a dict of extra batch keys."""
  fns = []
  source = source_of(data_config)
  if is_image_only(data_config):
    if data_config.get("subcaptions"):
      raise ValueError(f"config.data.subcaptions needs long captions, but "
                       f"config.data.source={source!r} is image-only.")
    if (data_config.get("views") or {}).get("text"):
      raise ValueError(f"config.data.views.text augments captions, but "
                       f"config.data.source={source!r} is image-only.")
  if tokenizer is None and data_config.get("subcaptions"):
    raise ValueError("config.data.subcaptions needs a tokenizer (config.tokenizer).")
  if data_config.get("subcaptions"):
    fns.append(subcaptions.subcaption_features(tokenizer, seed=data_config.get("seed", 0),
                                               **data_config.subcaptions))
  if data_config.get("views"):
    fns.append(augment.view_features(tokenizer, seed=data_config.get("seed", 0),
                                     **data_config.views))
  kind = data_config.get("regression_target")
  if kind:
    if source != "shapes":
      raise ValueError(f"config.data.regression_target={kind!r} needs the shapes source (its "
                       f"object boxes); config.data.source={source!r}.")
    if kind not in shapes.REGRESSION_TARGETS:
      raise ValueError(f"config.data.regression_target={kind!r}; expected one of "
                       f"{shapes.REGRESSION_TARGETS}.")
    fns.append(lambda example: {"target": shapes.regression_target(example, kind)})
  return fns


def training_features(data_config: Mapping[str, Any], tokenizer: Optional[Tokenizer]):
  """The source's base features (``image_text_features``, or ``image_features`` for image-only
  sources and without a tokenizer) plus the extra keys of :func:`extra_feature_fns`."""
  normalization = data_config.get("normalization", "minus_one_to_one")
  if is_image_only(data_config) or tokenizer is None:
    base = image_features(normalization)
  else:  # stream sources name the chosen caption "caption" (text_key is their feature name)
    text_key = ("caption" if source_of(data_config) in STREAM_SOURCES
                else data_config.get("text_key", "caption"))
    base = image_text_features(tokenizer, text_key, normalization)
  extras = extra_feature_fns(data_config, tokenizer)

  def fn(example):
    out = base(example)
    for extra in extras:
      out.update(extra(example))
    return out

  return fn


def provided_batch_keys(data_config: Mapping[str, Any], *, has_tokenizer: bool) -> tuple:
  """The batch keys :func:`train_dataset` yields for ``config.data`` (bookkeeping keys left
  out), from the config alone: :func:`training_features`' keys, without building tf.data.
  Text keys need a tokenizer and a captioned source; each ``config.data.views`` group that is
  present adds its keys (``ssl`` -> ``views`` (+ ``view_boxes``), ``multicrop`` -> ``crops``,
  ``local`` -> ``local_views``, ``text`` -> ``text_aug`` / ``text_aug_mask``)."""
  keys = ["image", "label", "index"]
  if has_tokenizer and not is_image_only(data_config):
    keys += ["text", "text_mask"]
  if data_config.get("subcaptions"):
    keys += ["subcaptions", "subcaption_mask"]
  views = data_config.get("views") or {}
  ssl = views.get("ssl") if views else None
  if ssl is not None:
    keys += ["views"] + (["view_boxes"] if ssl.get("boxes") else [])
  for group, added in (("multicrop", ["crops"]), ("local", ["local_views"]),
                       ("text", ["text_aug", "text_aug_mask"])):
    if views and views.get(group) is not None:
      keys += added
  if data_config.get("regression_target"):
    keys.append("target")
  return tuple(keys)


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


def _fashion_image_size(data_config: Mapping[str, Any]) -> int:
  size = data_config.get("image_size", fashion_mnist.IMAGE_SIZE)
  if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 512:
    raise ValueError(f"config.data.image_size={size!r} for fashion_mnist; expected an int in "
                     f"[8, 512] (the images are {fashion_mnist.IMAGE_SIZE} px; others resize).")
  return size


def resize_raw(size: int):
  """``fn(raw example) -> raw example`` with its uint8 image resized to ``size × size``
  (bilinear, antialiased, rounded); the identity at the source's own size."""

  def fn(example):
    if example["image"].shape[0] == size and example["image"].shape[1] == size:
      return example
    image = tf.image.resize(tf.cast(example["image"], tf.float32), [size, size],
                            method="bilinear", antialias=True)
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return dict(example, image=image)

  return fn


def _fashion_train_fn(data_config: Mapping[str, Any]):
  example = fashion_mnist.train_example_fn(seed=data_config.get("seed", 0),
                                           data_dir=data_config.get("data_dir"),
                                           num_examples=data_config.get("num_examples"))
  resize = resize_raw(_fashion_image_size(data_config))
  return lambda position: resize(example(position))


def _shapes_train_fn(data_config: Mapping[str, Any]):
  if data_config.get("inflation"):  # AdaInf: finite real scenes among "generated" ones
    return inflation.example_fn(data_config)
  scene = shapes.example_fn("train", **_shapes_kwargs(data_config))
  n = data_config.get("num_examples")
  if n is None:
    return scene
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"config.data.num_examples={n!r}; expected a positive int (or None: an "
                     f"endless stream of new scenes).")
  seed = data_config.get("seed", 0)

  def fn(position):
    position = tf.cast(position, tf.int64)
    example = scene(fashion_mnist.shuffled_row(position, n, seed))
    example["position"] = position
    return example

  return fn


def _host_stream(data_config: Mapping[str, Any], data_state: Mapping[str, Any]):
  """``(positioned raw stream, parse fn)`` of this host's part of a stream source."""
  seed = data_config.get("seed", 0)
  p, count = jax.process_index(), jax.process_count()
  if source_of(data_config) == "shards":
    files = shards_lib.host_files(shards_lib.list_files(data_config.get("shards")), p, count)
    epoch_fn = shards_lib.epoch_fn(files, seed=seed,
                                   cycle_length=data_config.get("cycle_length", 16))
    parse = shards_lib.parse_fn(data_config)
  else:
    epoch_fn, parse = tfds_source.epoch_fn(data_config, p, count), (lambda raw: raw)
  stream = records.positioned_stream(
      epoch_fn, seed=seed, window=data_config.get("shuffle_window", 1024),
      start_epoch=data_state["epoch"], start_offset=data_state["offset"])
  return stream, parse


def stream_train_dataset(config, tokenizer: Optional[Tokenizer],
                         data_state: Optional[Mapping[str, Any]] = None) -> tf.data.Dataset:
  """This host's batches of a stream source (shards, TFDS), resumed at ``data_state``
  (:func:`records.host_state` of the last batch before the checkpoint; None: the start).

  Batches carry the bookkeeping keys of :mod:`records` (``_epoch``, ``_offset``,
  ``_skipped``, ``_converted_count``) besides the batch keys.
  """
  data = config.data
  data_state = data_state or records.initial_state()
  stream, parse = _host_stream(data, data_state)
  needs_text = tokenizer is not None and not is_image_only(data)
  record_fn = streams.train_record_fn(data, needs_text=needs_text)
  ds = streams.process(stream, lambda rec: record_fn(parse(rec)), counts=data_state["counts"],
                       deterministic=data.get("deterministic", True))
  features = training_features(data, tokenizer)

  def fn(example):
    out = features({k: v for k, v in example.items() if not k.startswith("_")})
    out.update({k: v for k, v in example.items() if k.startswith("_")})
    return out

  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=data.get("deterministic", True))
  per_host = config.batch_size // jax.process_count()
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_dataset(config, tokenizer: Optional[Tokenizer] = None, *, start_step: int = 0,
                  data_state: Optional[Mapping[str, Any]] = None) -> tf.data.Dataset:
  """This host's batches of the training data, resumed at ``start_step``.

  ``tokenizer``: tokenizes captions (None: image-only batches, see the module docstring).
  ``data_state``: stream sources resume from this host's saved position (the index-based
  sources need only ``start_step``).
  """
  data = config.data
  source = source_of(data)
  if source in STREAM_SOURCES:
    return stream_train_dataset(config, tokenizer, data_state)
  if source == "shapes":
    example_fn = _shapes_train_fn(data)
  else:
    example_fn = _fashion_train_fn(data)
  per_host = config.batch_size // jax.process_count()
  ds = host_example_indices(start_step, config.batch_size)
  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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


def image_eval_dataset(data_config, *, split: str, num_examples: Optional[int] = None,
                       single_object: bool = False) -> tf.data.Dataset:
  """Unbatched, preprocessed labelled images for image-only evaluation (kNN, linear probe).

  Elements are ``{"image": float32 [S, S, 3] in [-1, 1], "label": int32, "index": int64}``
  in a fixed order, the same on every host (memory bank: ``split="train"``, queries:
  ``split="test"``).

  Args:
    data_config: ``config.data``; its ``source`` picks the data.
    split: ``"train"`` or ``"test"`` (``tfds``: any split of the dataset, see
      :func:`stream_eval_dataset`). ``fashion_mnist``: the 60000 / 10000 images (resized to
      ``data_config.image_size`` if it is not 28). ``shapes``: :func:`shapes.dataset`'s
      splits, ``"train"`` with the training scenes' object range, ``"test"`` the canonical
      one (as :func:`eval_dataset`).
    num_examples: the first ``num_examples`` examples of the split (before any filtering).
      None: the whole split, except that ``"train"`` is the training set
      ``data_config.num_examples`` when that is set (required for the endless shapes
      ``"train"`` split).
    single_object: ``shapes`` only: keep the single-object scenes, the ones with a class
      label (otherwise multi-object scenes come with label -1). Every Fashion-MNIST image
      has a label, so it changes nothing there.
  """
  source = source_of(data_config)
  if source in STREAM_SOURCES:
    return stream_eval_dataset(data_config, None, split=split, num_examples=num_examples)
  if split == "train" and num_examples is None:
    num_examples = data_config.get("num_examples")
  if source == "fashion_mnist":
    size = _fashion_image_size(data_config)
    ds = fashion_mnist.dataset(split, data_dir=data_config.get("data_dir"),
                               num_examples=num_examples)
    ds = ds.map(resize_raw(size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    if split not in shapes.SPLITS:
      raise ValueError(f"Unknown shapes split {split!r}; known: {list(shapes.SPLITS)}.")
    if split == "train" and num_examples is None:
      raise ValueError("The shapes train split is endless: image_eval_dataset needs "
                       "num_examples (or a finite config.data.num_examples).")
    objects = {}
    if split == "train":  # the training scenes themselves (test: the canonical split)
      objects = dict(min_objects=data_config.get("min_objects", 1),
                     max_objects=data_config.get("max_objects", shapes.MAX_OBJECTS))
    ds = shapes.dataset(split, seed=data_config.get("seed", 0),
                        image_size=data_config.image_size, num_examples=num_examples, **objects)
    if single_object:
      ds = ds.filter(lambda ex: ex["label"] >= 0)
  return ds.map(image_features(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def stream_eval_dataset(data_config, tokenizer: Optional[Tokenizer], *, split: Optional[str] = None,
                        shards: Optional[str] = None, num_examples: Optional[int] = None,
                        num_captions: int = 0) -> tf.data.Dataset:
  """Unbatched evaluation examples of a stream source, in a fixed order, on every host.

  Images are resized (shorter side) and centre-cropped to ``config.data.image_size`` and
  normalised like the training images; bad records are skipped, as in training.

  Args:
    data_config: ``config.data``; ``source`` is ``"shards"`` or ``"tfds"``.
    tokenizer: tokenizes the captions (None: images only).
    split: ``tfds``: the TFDS split (slicing allowed, e.g. ``"validation[:1000]"``).
    shards: ``shards``: the glob of the evaluation shards.
    num_examples: the first ``num_examples`` records (None: all).
    num_captions: with a tokenizer, ``text`` int32 ``[num_captions, L]``, ``text_mask`` and
      ``text_valid`` bool ``[num_captions]``: every caption of the record (up to
      ``num_captions``; the retrieval evaluator scores them all as positives of the image).
      ``0``: ``text`` / ``text_mask`` ``[L]`` of the first caption.
  """
  source = source_of(data_config)
  if source == "shards":
    if not shards:
      raise ValueError("Evaluating on shards needs their glob (the evaluator's `shards`).")
    files = tf.data.Dataset.from_tensor_slices(shards_lib.list_files(shards))
    records_ds = files.flat_map(lambda f: tf.data.TFRecordDataset(f).ignore_errors(
        log_warning=True)).enumerate().map(lambda i, r: {"record": r, "index": i})
    records_ds = records_ds.map(shards_lib.parse_fn(data_config))
  else:
    records_ds = tfds_source.eval_records(data_config, split or "test")
  if num_examples:
    records_ds = records_ds.take(num_examples)
  want_text = tokenizer is not None and not is_image_only(data_config)
  record_fn = streams.eval_record_fn(data_config, num_captions=max(num_captions, 1)
                                     if want_text else 0)
  ds = streams.process(streams.sequenced(records_ds), record_fn)
  normalization = data_config.get("normalization", "minus_one_to_one")

  def features(ex):
    out = {"image": scale_image(ex["image"], normalization), "label": ex["label"],
           "index": ex["index"]}
    if want_text:
      text, mask = tokenizer.tokenize(ex["captions"])
      if num_captions:
        out.update(text=text, text_mask=mask, text_valid=ex["caption_valid"])
      else:
        out.update(text=text[0], text_mask=mask[0])
    return out

  return ds.map(features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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


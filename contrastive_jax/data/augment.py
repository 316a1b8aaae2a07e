"""Image and caption augmentations for multi-view objectives (SLIP, CLIP🚀, SimCLR, SwAV,
PixPro), as TF ops.

All randomness is stateless and derived from ``(seed, example key, group, view)``: view
``v`` of example ``i`` is bitwise identical however the pipeline is sharded, parallelised or
resumed, and different views / examples / groups get independent draws. The example key is
the example's ``position`` in the training stream when the source provides one (a finite
source read for several epochs, e.g. Fashion-MNIST: an image gets new views every epoch),
else its ``index``.

``config.data.views`` selects the groups; :func:`view_features` turns them into per-example
batch keys (``V`` / ``N`` views per example; pixels in ``[-1, 1]`` like the ``image`` key):

=================  =============================  ==========================================
key                shape / dtype (per batch)      meaning
=================  =============================  ==========================================
``views``          float32 ``[B, V, S, S, 3]``    ``ssl`` group: SimCLR views (image only)
``view_boxes``     float32 ``[B, V, 4]``          their crop boxes, if ``ssl.boxes`` (below)
``crops``          float32 ``[B, N, s, s, 3]``    ``multicrop`` group: SwAV's small crops
``local_views``    float32 ``[B, N, s, s, 3]``    ``local`` group: CLIP🚀 augmented crops
``text_aug``       int32 ``[B, N, L]``            ``text`` group: augmented captions
``text_aug_mask``  bool ``[B, N, L]``             True on real tokens of ``text_aug``
=================  =============================  ==========================================

A group is a mapping of :class:`ViewSpec` (image groups) or :class:`TextSpec` fields, e.g.
``views = dict(ssl=dict(num=2, flip=True), local=dict(num=2, scale=(0.6, 1.0)),
text=dict(num=2, dropout=0.1))``. The ``multicrop`` group defaults to SwAV's small crops
(``num=6, scale=(0.05, 0.14)``); set its ``size`` (SwAV: 96 px for 224 px global views).

Geometry: a crop box ``(x0, y0, x1, y1)`` is in ``[0, 1]`` coordinates of the original
image (0 and 1 are its outer edges); output pixel ``(u, v)`` of an ``S × S`` view is the
bilinear sample at ``(x0 + (u + ½)(x1 − x0)/S, y0 + (v + ½)(y1 − y0)/S)`` (half-pixel
centres, edge pixels replicated outside), so a horizontally flipped view is exactly the view
of the box with ``x0`` and ``x1`` swapped (``x0 > x1``), and feature-map bin centres follow
the same formula (PixPro, METHODS.md §1.10).

Captions of the shapes data name positions ("at the top left"): a view that is paired with
a caption must not be flipped and should be cropped mildly, and its colours should not be
hue-shifted or removed (captions name colours). Image-only SSL views may use everything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from contrastive_jax.data.tokenizers import Tokenizer

_ALG = "philox"
_STREAM = 0x61756780  # separates augmentation draws from the data source's own stream
_GROUPS = {"ssl": 1, "local": 2, "text": 3, "multicrop": 4}
# Defaults of a group that differ from ViewSpec's (SwAV's small crops, METHODS.md §1.6).
_GROUP_DEFAULTS = {"multicrop": dict(num=6, scale=(0.05, 0.14))}
_SOLARIZE_KEY = 6  # fold-in of the view key that draws the solarize coin

# Function words removed (with probability ``stopword_p``) by the text augmentation.
STOP_WORDS = (
    "a", "an", "the", "and", "or", "of", "at", "on", "in", "is", "are", "was", "were", "be",
    "to", "with", "for", "from", "by", "as", "it", "its", "this", "that", "these", "those",
    "there", "has", "have", "had", "some", "very",
)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One group of augmented image views (SimCLR's recipe with its defaults).

  Attributes:
    num: views per example.
    size: output side in pixels (None: the input image's side).
    scale: range of the crop's area as a fraction of the image (random resized crop).
    ratio: range of the crop's aspect ratio ``w / h`` (sampled log-uniformly).
    flip: flip horizontally with probability ½.
    jitter: colour jitter strengths ``(brightness, contrast, saturation, hue)``, torchvision's
      meaning: factors ``U(1 − x, 1 + x)``, hue shift ``U(−h, h)`` of a full turn.
    jitter_p: probability of applying the colour jitter.
    gray_p: probability of converting to grayscale.
    blur_p: probability of a Gaussian blur.
    blur_sigma: range of the blur's σ in output pixels (kernel radius ``max(1, size // 20)``,
      SimCLR's 10 % of the side).
    solarize_p: probability of solarizing (pixels ``≥ 0.5`` become ``1 − x``), applied last.
    boxes: also emit each view's crop box (``view_boxes``; ``ssl`` group only).
  """

  num: int = 2
  size: Optional[int] = None
  scale: Tuple[float, float] = (0.08, 1.0)
  ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
  jitter_p: float = 0.8
  gray_p: float = 0.2
  blur_p: float = 0.5
  blur_sigma: Tuple[float, float] = (0.1, 2.0)
  solarize_p: float = 0.0
  boxes: bool = False


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """Augmented captions (CLIP🚀's EDA-style token dropout and stop-word removal).

  Attributes:
    num: augmented captions per example.
    dropout: probability of dropping each word.
    stopword_p: probability of dropping each word of :data:`STOP_WORDS`.
    clean: lower-case and strip punctuation first ("clean before augment").
  """

  num: int = 2
  dropout: float = 0.1
  stopword_p: float = 0.8
  clean: bool = True


def _make_spec(cls, group: str, fields: Optional[Mapping[str, Any]]):
  fields = dict(fields or {})
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.data.views.{group} has unknown fields {unknown}; "
                     f"known: {sorted(known)}.")
  for key, value in fields.items():
    if isinstance(value, list):
      fields[key] = tuple(value)
  defaults = _GROUP_DEFAULTS.get(group, {})
  spec = cls(**{**defaults, **fields})
  if spec.num < 1:
    raise ValueError(f"config.data.views.{group}.num={spec.num}; need at least 1 (drop the "
                     f"group to have none).")
  if cls is ViewSpec:
    lo, hi = spec.scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"config.data.views.{group}.scale={spec.scale}; need "
                       f"0 < lo <= hi <= 1 (area fractions of the image).")
    if not 0.0 <= spec.solarize_p <= 1.0:
      raise ValueError(f"config.data.views.{group}.solarize_p={spec.solarize_p}; need [0, 1].")
    if spec.boxes and group != "ssl":
      raise ValueError(f"config.data.views.{group}.boxes=True; crop boxes (view_boxes) are "
                       f"only emitted for the ssl group.")
  return spec


def group_spec(group: str, fields: Optional[Mapping[str, Any]] = None):
  """The :class:`ViewSpec` (or, for ``"text"``, :class:`TextSpec`) of a ``config.data.views``
  group from its fields, with the group's defaults, validated.

  Raises:
    ValueError: an unknown group or field, or an invalid value.
  """
  if group not in _GROUPS:
    raise ValueError(f"config.data.views.{group}: unknown group; known: {sorted(_GROUPS)}.")
  return _make_spec(TextSpec if group == "text" else ViewSpec, group, fields)


def example_key(seed: int, index, group: int, view) -> tf.Tensor:
  """Stateless seed ``[2]`` of one view: ``(seed, stream) ⊕ index ⊕ group ⊕ view``."""
  key = tf.constant([seed, _STREAM], tf.int64)
  for data in (tf.cast(index, tf.int64), tf.constant(group, tf.int64), tf.cast(view, tf.int64)):
    key = tf.random.experimental.stateless_fold_in(key, data, alg=_ALG)
  return key


def _uniform(key, n: int, lo=0.0, hi=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([n], seed=key, minval=lo, maxval=hi, alg=_ALG)


def crop_box(image: tf.Tensor, box, size: int) -> tf.Tensor:
  """Bilinear ``size × size`` view of ``box`` (see the module docstring's geometry).

  Args:
    image: float32 ``[H, W, C]``.
    box: float32 ``[4]`` ``(x0, y0, x1, y1)`` in ``[0, 1]`` image coordinates; ``x0 > x1``
      gives the mirrored view.

  Returns:
    float32 ``[size, size, C]``.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  h_px, w_px = shape[0], shape[1]
  x0, y0, x1, y1 = tf.unstack(tf.cast(box, tf.float32))
  # Pixel-index coordinates (pixel i's centre is at i) of the first and last sample.
  first = lambda lo, hi, n: lo * n - 0.5 + 0.5 * (hi - lo) * n / size  # noqa: E731
  last = lambda lo, hi, n: lo * n - 0.5 + (size - 0.5) * (hi - lo) * n / size  # noqa: E731
  # crop_and_resize samples linearly from box corner to corner with c ↦ c·(n − 1), and
  # extrapolates with zeros; one replicated edge pixel of padding clamps instead (samples
  # never go past half a pixel outside the image).
  padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]], "SYMMETRIC")
  norm = lambda p, n: (p + 1.0) / (n + 1.0)  # noqa: E731  (index in the padded image)
  tf_box = tf.stack([norm(first(y0, y1, h_px), h_px), norm(first(x0, x1, w_px), w_px),
                     norm(last(y0, y1, h_px), h_px), norm(last(x0, x1, w_px), w_px)])
  out = tf.image.crop_and_resize(padded[None], tf_box[None], [0], [size, size],
                                 method="bilinear")
  return out[0]


def random_resized_crop(image: tf.Tensor, key, size: int, scale: Sequence[float],
                        ratio: Sequence[float]) -> Tuple[tf.Tensor, tf.Tensor]:
  """A crop of random area fraction ``U(scale)`` and aspect ``w/h`` (log-uniform in ``ratio``),
  clipped to the image, at a uniform position, resized (bilinear) to ``size × size``.

  Args:
    image: float32 ``[H, W, 3]``.
    key: stateless seed ``[2]``.

  Returns:
    ``(view, box)``: float32 ``[size, size, 3]`` and its box, float32 ``[4]``
    ``(x0, y0, x1, y1)`` in ``[0, 1]`` image coordinates (``x0 < x1``, ``y0 < y1``).
  """
  u = _uniform(key, 4)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  h_px, w_px = shape[0], shape[1]
  area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h_px * w_px
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
  aspect = tf.exp(log_r)
  w = tf.minimum(tf.sqrt(area * aspect) / w_px, 1.0)  # fractions of the side
  h = tf.minimum(tf.sqrt(area / aspect) / h_px, 1.0)
  x0 = (1.0 - w) * u[2]
  y0 = (1.0 - h) * u[3]
  box = tf.stack([x0, y0, x0 + w, y0 + h])
  return crop_box(image, box, size), box


def _grayscale(image):
  return tf.image.rgb_to_grayscale(image)  # [H, W, 1]


def color_jitter(image: tf.Tensor, key, strengths: Sequence[float]) -> tf.Tensor:
  """Brightness, contrast, saturation, hue in this fixed order (torchvision's factors).

  Args:
    image: float32 ``[H, W, 3]`` in ``[0, 1]``.
    strengths: ``(brightness, contrast, saturation, hue)``.
  """
  b, c, s, h = strengths
  u = _uniform(key, 4)
  factor = lambda x, v: (1.0 - x) + 2.0 * x * v  # U(1 − x, 1 + x)
  if b:
    image = tf.clip_by_value(image * tf.maximum(factor(b, u[0]), 0.0), 0.0, 1.0)
  if c:
    mean = tf.reduce_mean(_grayscale(image))
    image = tf.clip_by_value((image - mean) * tf.maximum(factor(c, u[1]), 0.0) + mean, 0.0, 1.0)
  if s:
    gray = _grayscale(image)
    image = tf.clip_by_value(gray + (image - gray) * tf.maximum(factor(s, u[2]), 0.0), 0.0, 1.0)
  if h:
    image = tf.image.adjust_hue(image, h * (2.0 * u[3] - 1.0))
  return image


def gaussian_blur(image: tf.Tensor, sigma, radius: int) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding; ``image`` float32 ``[H, W, 3]``."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel = kernel / tf.reduce_sum(kernel)
  channels = 3
  kx = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  ky = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
  out = tf.nn.depthwise_conv2d(padded, kx, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")
  return out[0]


def solarize(image: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """Pixels ``≥ threshold`` become ``1 − x`` (``image`` in ``[0, 1]``)."""
  return tf.where(image >= threshold, 1.0 - image, image)


def augment_view(image: tf.Tensor, key, spec: ViewSpec,
                 size: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """One view of ``image`` (float32 ``[H, W, 3]`` in ``[0, 1]``): crop, flip, colour jitter,
  grayscale, blur, solarize, each drawn from its own sub-seed of ``key``.

  Returns:
    ``(view, box)``: float32 ``[size, size, 3]`` in ``[0, 1]`` and float32 ``[4]``
    ``(x0, y0, x1, y1)``, with ``x0 > x1`` when the view was flipped.
  """
  keys = tf.random.experimental.stateless_split(key, num=6, alg=_ALG)
  coins = _uniform(keys[5], 5)
  view, box = random_resized_crop(image, keys[0], size, spec.scale, spec.ratio)
  if spec.flip:
    flipped = coins[0] < 0.5
    view = tf.where(flipped, tf.image.flip_left_right(view), view)
    box = tf.where(flipped, tf.gather(box, [2, 1, 0, 3]), box)
  if spec.jitter_p > 0 and any(spec.jitter):
    view = tf.where(coins[1] < spec.jitter_p, color_jitter(view, keys[1], spec.jitter), view)
  if spec.gray_p > 0:
    gray = tf.tile(_grayscale(view), [1, 1, 3])
    view = tf.where(coins[2] < spec.gray_p, gray, view)
  if spec.blur_p > 0:
    lo, hi = spec.blur_sigma
    sigma = lo + (hi - lo) * coins[3]
    blurred = gaussian_blur(view, sigma, max(1, size // 20))
    view = tf.where(coins[4] < spec.blur_p, blurred, view)
  if spec.solarize_p > 0:
    coin = _uniform(tf.random.experimental.stateless_fold_in(key, _SOLARIZE_KEY, alg=_ALG), 1)
    view = tf.where(coin[0] < spec.solarize_p, solarize(view), view)
  return view, box


def image_views_and_boxes(image: tf.Tensor, index, *, seed: int, group: str,
                          spec: ViewSpec) -> Tuple[tf.Tensor, tf.Tensor]:
  """``spec.num`` views of one uint8 ``[H, W, 3]`` image.

  Returns:
    ``(views, boxes)``: float32 ``[num, S, S, 3]`` in ``[-1, 1]`` and float32 ``[num, 4]``
    (see :func:`augment_view`).
  """
  pixels = tf.cast(image, tf.float32) / 255.0
  size = spec.size or image.shape[0]
  if size is None:
    raise ValueError(f"config.data.views.{group}.size is needed: the image size is not static.")
  views, boxes = zip(*[augment_view(pixels, example_key(seed, index, _GROUPS[group], v), spec,
                                    size) for v in range(spec.num)])
  return tf.stack(views) * 2.0 - 1.0, tf.stack(boxes)


def image_views(image: tf.Tensor, index, *, seed: int, group: str, spec: ViewSpec) -> tf.Tensor:
  """``spec.num`` views of one uint8 ``[H, W, 3]`` image -> float32 ``[num, S, S, 3]`` in
  ``[-1, 1]``."""
  return image_views_and_boxes(image, index, seed=seed, group=group, spec=spec)[0]


def augment_caption(caption: tf.Tensor, key, spec: TextSpec) -> tf.Tensor:
  """Word dropout and stop-word removal on one scalar ``tf.string`` caption.

  Each word is dropped with probability ``dropout``, and each stop word also with probability
  ``stopword_p``; if nothing is left the (cleaned) caption is kept whole.
  """
  text = caption
  if spec.clean:
    text = tf.strings.regex_replace(tf.strings.lower(text), r"[^a-z0-9 ]+", " ")
  words = tf.strings.split(text)
  n = tf.shape(words)[0]
  k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, num=2, alg=_ALG))
  drop = tf.random.stateless_uniform([n], seed=k1, alg=_ALG) < spec.dropout
  stop = tf.reduce_any(tf.equal(tf.strings.lower(words)[:, None],
                                tf.constant(STOP_WORDS)[None, :]), axis=1)
  drop |= stop & (tf.random.stateless_uniform([n], seed=k2, alg=_ALG) < spec.stopword_p)
  kept = tf.boolean_mask(words, tf.logical_not(drop))
  kept = tf.cond(tf.size(kept) > 0, lambda: kept, lambda: words)
  return tf.strings.reduce_join(kept, separator=" ")


def text_views(caption: tf.Tensor, index, tokenizer: Tokenizer, *, seed: int,
               spec: TextSpec) -> Tuple[tf.Tensor, tf.Tensor]:
  """``spec.num`` augmented captions -> (int32 ``[num, L]`` tokens, bool ``[num, L]`` mask)."""
  texts = tf.stack([augment_caption(caption, example_key(seed, index, _GROUPS["text"], v), spec)
                    for v in range(spec.num)])
  return tokenizer.tokenize(texts)


def view_features(tokenizer: Optional[Tokenizer], *, seed: int, ssl: Optional[Mapping] = None,
                  local: Optional[Mapping] = None, text: Optional[Mapping] = None,
                  multicrop: Optional[Mapping] = None, text_key: str = "caption"):
  """The ``config.data.views`` feature function (see the module docstring for the keys).

  Args:
    tokenizer: tokenizes the augmented captions (may be None without a ``text`` group).
    seed: the data seed; views also depend on the example's ``position`` (else ``index``).
    ssl: :class:`ViewSpec` fields of the image-only views (``views``, ``view_boxes``), or None.
    local: :class:`ViewSpec` fields of the caption-paired views (``local_views``), or None.
    text: :class:`TextSpec` fields of the augmented captions (``text_aug``), or None.
    multicrop: :class:`ViewSpec` fields of the small crops (``crops``), or None.
    text_key: the example's caption feature.

  Returns:
    ``fn(example) -> dict`` of the new keys, for a raw example with uint8 ``image [H, W, 3]``,
    int ``index`` (optionally int ``position``) and, for ``text``, the ``text_key`` string.
  """
  groups = dict(ssl=ssl, local=local, multicrop=multicrop, text=text)
  specs = {g: None if fields is None else group_spec(g, fields) for g, fields in groups.items()}
  if specs["text"] and tokenizer is None:
    raise ValueError("config.data.views.text needs a tokenizer (augmented captions).")

  def fn(example):
    out = {}
    key = example["position"] if "position" in example else example["index"]
    if specs["ssl"]:
      out["views"], boxes = image_views_and_boxes(example["image"], key, seed=seed, group="ssl",
                                                  spec=specs["ssl"])
      if specs["ssl"].boxes:
        out["view_boxes"] = boxes
    if specs["multicrop"]:
      out["crops"] = image_views(example["image"], key, seed=seed, group="multicrop",
                                 spec=specs["multicrop"])
    if specs["local"]:
      out["local_views"] = image_views(example["image"], key, seed=seed, group="local",
                                       spec=specs["local"])
    if specs["text"]:
      if text_key not in example:
        raise ValueError(f"config.data.views.text augments captions ({text_key!r}), but the "
                         f"source's examples have none; features: {sorted(example)}.")
      out["text_aug"], out["text_aug_mask"] = text_views(example[text_key], key, tokenizer,
                                                         seed=seed, spec=specs["text"])
    return out

  return fn

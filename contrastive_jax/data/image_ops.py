"""Image decoding, cropping and normalisation of ONE encoded example, as TF ops.

Every function works in graph mode inside ``tf.data`` maps; randomness is stateless (``seed``
is an int32/int64 ``[2]`` tensor, e.g. from ``tf.random.experimental.stateless_fold_in`` of
the example's stream position), so a crop depends on ``(image, seed)`` only. Pass independent
seeds to :func:`random_resized_crop` and :func:`random_flip` (``stateless_split`` one seed).

Pixel conventions: decoders return uint8 ``[H, W, 3]``; crops and resizes return float32
``[size, size, 3]`` in ``[0, 255]`` (bicubic overshoot clipped; not rounded: no uint8 round trip
before :func:`normalize`, which maps them to the model's input range).

Which functions may raise (``tf.errors.InvalidArgumentError`` at run time) on bad bytes:
:func:`image_format` never; :func:`native_channels` only for a JPEG whose header is corrupt;
:func:`decode_rgb`, :func:`random_resized_crop` and :func:`resize_center_crop` on anything
that does not decode. A pipeline drops those examples with
``tf.data.experimental.ignore_errors`` (and counts them) rather than checking bytes first.

Formats: JPEG, PNG, GIF (first frame), BMP and WebP, recognised by their magic bytes (the file
name or declared type is not consulted). Only JPEG has a decode-only-the-window fast path
(``tf.io.decode_and_crop_jpeg``); other formats decode the whole image, then crop.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf

# Codes returned by image_format.
FORMAT_UNKNOWN, FORMAT_JPEG, FORMAT_PNG, FORMAT_GIF, FORMAT_BMP, FORMAT_WEBP = range(6)
FORMAT_NAMES = ("unknown", "jpeg", "png", "gif", "bmp", "webp")

# OpenAI CLIP's (and open_clip's) normalisation, and the torchvision ImageNet one.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("clip", "imagenet", "minus_one_to_one")

_HEADER = 32  # header bytes read by image_format / native_channels (zero-padded)
# PNG IHDR colour type -> channels: 0 gray, 2 RGB, 3 palette (RGB), 4 gray+alpha, 6 RGBA.
_PNG_CHANNELS = (1, -1, 3, 3, 2, -1, 4) + (-1,) * 249


def _header(encoded: tf.Tensor) -> tf.Tensor:
  """uint8 ``[32]``: the first 32 bytes of ``encoded``, zero-padded (never raises)."""
  head = tf.strings.substr(encoded, 0, _HEADER)
  padded = tf.strings.join([head, tf.constant(b"\x00" * _HEADER)])
  return tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER), tf.uint8, fixed_length=_HEADER)


def _starts(header: tf.Tensor, offset: int, magic: bytes) -> tf.Tensor:
  return tf.reduce_all(tf.equal(header[offset:offset + len(magic)],
                                tf.constant(list(magic), tf.uint8)))


def image_format(encoded) -> tf.Tensor:
  """The container format of encoded image bytes, from their magic bytes.

  Args:
    encoded: tf.string scalar.

  Returns:
    int32 scalar: :data:`FORMAT_JPEG` (1), ``PNG`` (2), ``GIF`` (3), ``BMP`` (4), ``WEBP`` (5),
    or :data:`FORMAT_UNKNOWN` (0) for anything else (empty or truncated input included). Never
    raises.
  """
  h = _header(tf.convert_to_tensor(encoded, tf.string))
  checks = [
      (FORMAT_JPEG, _starts(h, 0, b"\xff\xd8\xff")),
      (FORMAT_PNG, _starts(h, 0, b"\x89PNG\r\n\x1a\n")),
      (FORMAT_GIF, _starts(h, 0, b"GIF8")),
      (FORMAT_BMP, _starts(h, 0, b"BM")),
      (FORMAT_WEBP, tf.logical_and(_starts(h, 0, b"RIFF"), _starts(h, 8, b"WEBP"))),
  ]
  code = tf.constant(FORMAT_UNKNOWN, tf.int32)
  for value, ok in reversed(checks):
    code = tf.where(ok, tf.constant(value, tf.int32), code)
  return code


def native_channels(encoded) -> tf.Tensor:
  """The number of channels the file declares, read from its header without decoding.

  * JPEG (``tf.io.extract_jpeg_shape``): 1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK (:func:`decode_rgb`
    converts CMYK to RGB).
  * PNG (IHDR colour type): 1 gray, 3 RGB, 3 palette (even with a ``tRNS`` transparency
    chunk, which TF decodes as 4 channels), 2 gray + alpha, 4 RGBA.
  * GIF: 3. BMP (bits per pixel): 8 -> 1, 24 -> 3, 32 -> 4 (TF reads 8-bit BMPs as gray).
  * WebP: 4 if the VP8X / VP8L header flags alpha, else 3.

  Args:
    encoded: tf.string scalar.

  Returns:
    int32 scalar; -1 when it cannot tell (unknown format, unusual header). Raises only for a
    JPEG with a corrupt header (``extract_jpeg_shape``).
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  h = tf.cast(_header(encoded), tf.int32)
  unknown = lambda: tf.constant(-1, tf.int32)  # noqa: E731

  def jpeg():
    return tf.io.extract_jpeg_shape(encoded, output_type=tf.int32)[2]

  def png():
    ok = _starts(tf.cast(h, tf.uint8), 12, b"IHDR")
    return tf.where(ok, tf.gather(tf.constant(_PNG_CHANNELS, tf.int32), h[25]), -1)

  def bmp():
    bits = h[28] + 256 * h[29]
    return tf.case([(tf.equal(bits, 8), lambda: tf.constant(1)),
                    (tf.equal(bits, 24), lambda: tf.constant(3)),
                    (tf.equal(bits, 32), lambda: tf.constant(4))], default=unknown)

  def webp():
    hu = tf.cast(h, tf.uint8)
    alpha_x = tf.not_equal(tf.bitwise.bitwise_and(h[20], 0x10), 0)  # VP8X flags byte
    alpha_l = tf.not_equal(tf.bitwise.bitwise_and(h[24], 0x10), 0)  # VP8L alpha_is_used bit
    return tf.case([(_starts(hu, 12, b"VP8 "), lambda: tf.constant(3)),
                    (_starts(hu, 12, b"VP8X"), lambda: tf.where(alpha_x, 4, 3)),
                    (_starts(hu, 12, b"VP8L"), lambda: tf.where(alpha_l, 4, 3))],
                   default=unknown)

  return tf.switch_case(image_format(encoded),
                        [unknown, jpeg, png, lambda: tf.constant(3), bmp, webp])


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """uint8 ``[H, W, C]`` with ``C`` in 1..4 -> ``[H, W, 3]``: gray (with or without alpha)
  is replicated, alpha is dropped."""
  channels = tf.shape(image)[2]
  rgb = tf.cond(channels >= 3, lambda: image[:, :, :3],
                lambda: tf.tile(image[:, :, :1], [1, 1, 3]))
  rgb.set_shape([None, None, 3])
  return rgb


def decode_rgb(encoded) -> tf.Tensor:
  """Decodes JPEG / PNG / GIF (first frame) / BMP / WebP bytes to RGB.

  Decodes with the file's own channels, then: gray -> RGB (replicated), gray + alpha -> gray
  -> RGB, RGBA -> RGB by dropping alpha (what PIL's ``Image.convert("RGB")``, used by
  open_clip, does: transparent pixels keep their stored colour), CMYK JPEG -> RGB (libjpeg).
  16-bit PNGs are scaled to 8 bits.

  Args:
    encoded: tf.string scalar.

  Returns:
    uint8 ``[H, W, 3]`` (static channel dimension). Raises ``InvalidArgumentError`` at run time
    on bytes that do not decode.
  """
  image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
  return _to_rgb(image)


def crop_window(image_shape, seed, *, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """An Inception-style random crop window of an image of ``image_shape``.

  ``tf.image.stateless_sample_distorted_bounding_box`` with no object boxes: area fraction in
  ``scale``, aspect ratio ``width / height`` in ``ratio`` (TF samples the ratio uniformly, not
  log-uniformly like torchvision), integer pixel bounds; after 100 failed attempts (only for
  extreme shapes) it returns the whole image.

  Args:
    image_shape: int32 ``[3]`` (or ``[2]``) ``(height, width[, channels])``.
    seed: int32/int64 ``[2]``.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio ``width / height``.

  Returns:
    int32 ``[4]`` ``(y, x, height, width)``: ``tf.io.decode_and_crop_jpeg``'s ``crop_window``.
  """
  shape = tf.cast(tf.convert_to_tensor(image_shape), tf.int32)
  shape = tf.concat([shape[:2], [3]], 0)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _resize(image: tf.Tensor, shape, method: str, antialias: bool) -> tf.Tensor:
  image = tf.cast(image, tf.float32)
  if antialias and method == "bilinear":
    # The antialiasing kernel is several times slower, and for bilinear it only differs
    # (beyond float rounding) when some side shrinks.
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(shape, tf.int32))
    return tf.cond(shrinks, lambda: tf.image.resize(image, shape, method, antialias=True),
                   lambda: tf.image.resize(image, shape, method))
  out = tf.image.resize(image, shape, method=method, antialias=antialias)
  if method in ("bilinear", "area", "nearest"):  # non-negative weights: no overshoot
    return out
  return tf.clip_by_value(out, 0.0, 255.0)


def random_resized_crop(encoded, size: int, seed, *, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), method: str = "bilinear",
                        antialias: bool = True, decode_crop: bool = True) -> tf.Tensor:
  """Inception-style random resized crop (:func:`crop_window`), resized to ``size × size``.

  For JPEG bytes the window comes from the header (``tf.io.extract_jpeg_shape``) and only the
  window is decoded (``tf.io.decode_and_crop_jpeg``, several times faster on small crops);
  other formats (or ``decode_crop=False``) are decoded whole (:func:`decode_rgb`), then
  cropped. The same ``(image, seed)`` gives the same window on both paths.

  Args:
    encoded: tf.string scalar (encoded image), or an already decoded ``[H, W, 3]`` image
      (uint8 or float in ``[0, 255]``).
    size: output side in pixels.
    seed: int32/int64 ``[2]``.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio ``width / height``.
    method: ``tf.image.resize`` method.
    antialias: low-pass filter when shrinking (PIL / torchvision ``antialias=True`` behaviour).
    decode_crop: use the JPEG decode-only-the-window path (False: decode whole, then crop;
      for benchmarks and tests).

  Returns:
    float32 ``[size, size, 3]`` in ``[0, 255]``. Raises ``InvalidArgumentError`` at run time
    on bytes that do not decode.
  """
  encoded = tf.convert_to_tensor(encoded)
  kw = dict(scale=scale, ratio=ratio)

  def crop_decoded(image):
    y, x, h, w = tf.unstack(crop_window(tf.shape(image), seed, **kw))
    return image[y:y + h, x:x + w]

  if encoded.dtype != tf.string:
    image = crop_decoded(encoded)
  elif decode_crop:
    def jpeg():
      window = crop_window(tf.io.extract_jpeg_shape(encoded, tf.int32), seed, **kw)
      return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.cond(tf.equal(image_format(encoded), FORMAT_JPEG), jpeg,
                    lambda: crop_decoded(decode_rgb(encoded)))
  else:
    image = crop_decoded(decode_rgb(encoded))
  out = _resize(image, [size, size], method, antialias)
  out.set_shape([size, size, 3])
  return out


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
  """Flips ``image`` (``[H, W, C]``, any dtype) left-right with probability ½ (stateless)."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def resize_center_crop(encoded_or_image, size: int, method: str = "bicubic",
                       antialias: bool = True) -> tf.Tensor:
  """CLIP's evaluation transform: shorter side to ``size``, then the central ``size × size``.

  Matches torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (as open_clip uses them): the
  longer side becomes ``floor(size · long / short)``, the crop offset is
  ``round((side − size) / 2)`` with ties to even; the resize is antialiased (PIL-like).

  Args:
    encoded_or_image: tf.string scalar (decoded with :func:`decode_rgb`), or a ``[H, W, 3]``
      image (uint8, or float in ``[0, 255]``).
    size: output side in pixels.
    method: ``tf.image.resize`` method (``"bicubic"``: open_clip's default).
    antialias: low-pass filter when shrinking.

  Returns:
    float32 ``[size, size, 3]`` in ``[0, 255]``.
  """
  image = tf.convert_to_tensor(encoded_or_image)
  if image.dtype == tf.string:
    image = decode_rgb(image)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, size, (size * h) // short)
  new_w = tf.where(h <= w, (size * w) // short, size)
  image = _resize(image, tf.stack([new_h, new_w]), method, antialias)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  out = image[top:top + size, left:left + size]
  out.set_shape([size, size, 3])
  return out


def normalization_constants(kind: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """``(mean, std)`` of ``kind`` in ``[0, 1]`` pixel units (``x/255 ↦ (x/255 − mean)/std``).

  Raises:
    ValueError: an unknown kind.
  """
  if kind == "clip":
    return CLIP_MEAN, CLIP_STD
  if kind == "imagenet":
    return IMAGENET_MEAN, IMAGENET_STD
  if kind == "minus_one_to_one":
    return (0.5,) * 3, (0.5,) * 3
  raise ValueError(f"Unknown image normalization {kind!r}; known: {list(NORMALIZATIONS)}.")


def normalize(image, kind: str) -> tf.Tensor:
  """Pixels in ``[0, 255]`` -> the model's input range.

  * ``"clip"``: ``(x / 255 − CLIP_MEAN) / CLIP_STD`` (OpenAI CLIP, open_clip);
  * ``"imagenet"``: ``(x / 255 − IMAGENET_MEAN) / IMAGENET_STD``;
  * ``"minus_one_to_one"``: ``x / 127.5 − 1`` (this library's own models).

  Args:
    image: ``[..., 3]`` uint8 or float.
    kind: one of :data:`NORMALIZATIONS`.

  Returns:
    float32, the shape of ``image``.

  Raises:
    ValueError: an unknown ``kind`` (at trace time), naming the known ones.
  """
  mean, std = normalization_constants(kind)
  x = tf.cast(image, tf.float32)
  if kind == "minus_one_to_one":
    return x / 127.5 - 1.0
  # x · scale + offset per channel. TF's CPU kernels broadcast a [3] operand over [H, W, 3]
  # several times slower than an elementwise op on equal shapes, so the constants are tiled
  # to the flat image first (≈ 4× faster in a tf.data map).
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  pixels = tf.size(x) // 3
  flat = tf.reshape(x, [-1]) * tf.tile(scale, [pixels]) + tf.tile(offset, [pixels])
  out = tf.reshape(flat, tf.shape(x))
  out.set_shape(x.shape)
  return out

"""Tests of contrastive_jax.data.image_ops: format sniffing, decoding, crops, normalisation."""

import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import image_ops

# A 1 x 1 GIF89a (global colour table of 2, one image block).
TINY_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\x00\x00\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


def _pixels(h=24, w=32, c=3, seed=0):
  """Smooth random uint8 pixels (compress well, survive JPEG closely)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (3, 4, c)).astype(np.float32)
  return np.round(tf.image.resize(small, [h, w], "bilinear").numpy()).astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _palette_png(index: np.ndarray, palette: np.ndarray) -> bytes:
  """An 8-bit palette PNG (colour type 3), which tf.io.encode_png cannot write."""
  h, w = index.shape
  raw = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in index)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
          + _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
          + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def _bmp24(rgb: np.ndarray) -> bytes:
  """A 24-bit BMP (bottom-up rows of BGR, padded to 4 bytes)."""
  h, w, _ = rgb.shape
  stride = (3 * w + 3) // 4 * 4
  rows = [np.pad(row[:, ::-1].reshape(-1), (0, stride - 3 * w)).tobytes() for row in rgb[::-1]]
  data = b"".join(rows)
  return (b"BM" + struct.pack("<IHHI", 54 + len(data), 0, 0, 54)
          + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(data), 2835, 2835, 0, 0) + data)


def _jpeg(pixels, quality=95, chroma_downsampling=True) -> bytes:
  return tf.io.encode_jpeg(pixels, quality=quality,
                           chroma_downsampling=chroma_downsampling).numpy()


def _png(pixels) -> bytes:
  return tf.io.encode_png(pixels).numpy()


def _ramp_jpeg(h=375, w=500, chroma_downsampling=True) -> bytes:
  """Textured pixels (random walks along rows), like a photo for the JPEG decoder."""
  rng = np.random.default_rng(1)
  walk = np.cumsum(rng.normal(size=(h, w, 3)), axis=1) * 4 + 128
  return _jpeg(np.clip(walk, 0, 255).astype(np.uint8), 90, chroma_downsampling)


RGB = _pixels()
GRAY = _pixels(c=1, seed=1)
RGBA = _pixels(c=4, seed=2)
GRAY_ALPHA = _pixels(c=2, seed=3)
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50]], np.uint8)
INDEX = np.arange(24 * 32).reshape(24, 32) % 4


@pytest.mark.parametrize("name, encoded, fmt, channels", [
    ("jpeg_rgb", _jpeg(RGB), image_ops.FORMAT_JPEG, 3),
    ("jpeg_gray", _jpeg(GRAY), image_ops.FORMAT_JPEG, 1),
    ("png_rgb", _png(RGB), image_ops.FORMAT_PNG, 3),
    ("png_gray", _png(GRAY), image_ops.FORMAT_PNG, 1),
    ("png_gray_alpha", _png(GRAY_ALPHA), image_ops.FORMAT_PNG, 2),
    ("png_rgba", _png(RGBA), image_ops.FORMAT_PNG, 4),
    ("png_palette", _palette_png(INDEX, PALETTE), image_ops.FORMAT_PNG, 3),
    ("gif", TINY_GIF, image_ops.FORMAT_GIF, 3),
    ("bmp", _bmp24(RGB), image_ops.FORMAT_BMP, 3),
    ("garbage", b"not an image at all", image_ops.FORMAT_UNKNOWN, -1),
    ("empty", b"", image_ops.FORMAT_UNKNOWN, -1),
    ("png_truncated", b"\x89PNG\r\n\x1a\n\x00", image_ops.FORMAT_PNG, -1),
    ("webp_truncated", b"RIFF\x00\x00\x00\x00WEBP", image_ops.FORMAT_WEBP, -1),
])
def test_format_and_native_channels(name, encoded, fmt, channels):
  assert int(image_ops.image_format(encoded)) == fmt, name
  assert int(image_ops.native_channels(encoded)) == channels, name


def test_webp_and_cmyk_channels():
  """WebP alpha flags (lossy VP8X, lossless VP8L) and CMYK JPEGs, written with PIL."""
  pil = pytest.importorskip("PIL.Image")
  import io

  def save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()

  rgba = pil.fromarray(RGBA, "RGBA")
  for encoded, channels in [(save(rgba, "WEBP"), 4), (save(rgba, "WEBP", lossless=True), 4),
                            (save(rgba.convert("RGB"), "WEBP"), 3),
                            (save(rgba.convert("RGB"), "WEBP", lossless=True), 3)]:
    assert int(image_ops.image_format(encoded)) == image_ops.FORMAT_WEBP
    assert int(image_ops.native_channels(encoded)) == channels
    decoded = image_ops.decode_rgb(encoded).numpy()
    expected = np.asarray(pil.open(io.BytesIO(encoded)).convert("RGB"))
    np.testing.assert_array_equal(decoded, expected)
  cmyk = save(pil.fromarray(RGB).convert("CMYK"), "JPEG", quality=95)
  assert int(image_ops.native_channels(cmyk)) == 4
  np.testing.assert_allclose(image_ops.decode_rgb(cmyk).numpy(), RGB, atol=12)
  crop = image_ops.random_resized_crop(cmyk, 8, [1, 2]).numpy()  # decode_and_crop path
  assert crop.shape == (8, 8, 3) and crop.std() > 1


def test_decode_rgb_lossless_formats():
  gray3 = np.repeat(GRAY, 3, axis=-1)
  cases = [(_png(RGB), RGB), (_png(GRAY), gray3), (_png(RGBA), RGBA[..., :3]),
           (_png(GRAY_ALPHA), np.repeat(GRAY_ALPHA[..., :1], 3, -1)),
           (_palette_png(INDEX, PALETTE), PALETTE[INDEX]), (_bmp24(RGB), RGB)]
  for encoded, expected in cases:
    decoded = image_ops.decode_rgb(encoded)
    assert decoded.dtype == tf.uint8 and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded.numpy(), expected)
  assert image_ops.decode_rgb(TINY_GIF).shape == (1, 1, 3)


def test_decode_rgb_jpeg_close():
  for pixels in (RGB, GRAY):
    encoded = _jpeg(pixels, chroma_downsampling=False)
    decoded = image_ops.decode_rgb(encoded).numpy().astype(np.float32)
    expected = np.broadcast_to(pixels, decoded.shape).astype(np.float32)
    assert np.abs(decoded - expected).mean() < 2.0
    assert np.abs(decoded - expected).max() < 16
  with pytest.raises(tf.errors.InvalidArgumentError):
    image_ops.decode_rgb(b"garbage bytes")


def test_decode_and_crop_equals_decode_then_crop():
  """Exact without chroma subsampling; with 4:2:0 only the window's edge pixels may differ
  (libjpeg's chroma upsampling sees the neighbours outside the window)."""
  for chroma in (False, True):
    encoded = _ramp_jpeg(chroma_downsampling=chroma)
    full = tf.io.decode_jpeg(encoded, channels=3).numpy().astype(np.int32)
    for s in range(12):
      y, x, h, w = image_ops.crop_window(tf.io.extract_jpeg_shape(encoded), [s, 5]).numpy()
      crop = tf.io.decode_and_crop_jpeg(encoded, [y, x, h, w], channels=3).numpy()
      diff = np.abs(crop - full[y:y + h, x:x + w])
      if chroma:
        assert diff[1:-1, 1:-1].max() == 0 and diff.max() <= 12
      else:
        assert diff.max() == 0
    fast = image_ops.random_resized_crop(encoded, 32, [7, 7])
    slow = image_ops.random_resized_crop(encoded, 32, [7, 7], decode_crop=False)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=0 if not chroma else 2)


@pytest.mark.parametrize("shape, scale, ratio", [
    ((375, 500), (0.08, 1.0), (3 / 4, 4 / 3)),
    ((500, 375), (0.5, 0.6), (3 / 4, 4 / 3)),
    ((375, 500), (0.2, 1.0), (1.0, 1.0)),
])
def test_crop_window_statistics(shape, scale, ratio):
  n = 1000
  ds = tf.data.Dataset.range(n).map(
      lambda i: image_ops.crop_window(shape, tf.stack([i, 17]), scale=scale, ratio=ratio))
  y, x, h, w = next(iter(ds.batch(n))).numpy().T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= shape[0]).all() and (x + w <= shape[1]).all()
  area = h * w / (shape[0] * shape[1])
  assert area.min() >= scale[0] - 1e-9 and area.max() <= scale[1] + 1e-9
  aspect = w / h
  assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
  # The draws spread over the ranges (not a constant / fallback window).
  assert area.max() - area.min() > 0.7 * min(scale[1] - scale[0], 0.55)
  assert len(set(zip(y, x, h, w))) > 0.9 * n
  if ratio[1] > ratio[0]:
    assert aspect.max() - aspect.min() > 0.5 * (ratio[1] - ratio[0])


def test_random_resized_crop_seeds_and_formats():
  encoded = _ramp_jpeg(120, 160)
  a = image_ops.random_resized_crop(encoded, 24, tf.constant([1, 2], tf.int64))
  b = image_ops.random_resized_crop(encoded, 24, tf.constant([1, 2], tf.int32))
  c = image_ops.random_resized_crop(encoded, 24, [1, 3])
  assert a.dtype == tf.float32 and a.shape == (24, 24, 3)
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert np.abs(a.numpy() - c.numpy()).max() > 10
  assert a.numpy().min() >= 0 and a.numpy().max() <= 255
  # A PNG of the same pixels takes the decode-then-crop path with the same window.
  pixels = tf.io.decode_jpeg(encoded, channels=3)
  from_png = image_ops.random_resized_crop(_png(pixels.numpy()), 24, [1, 2])
  from_pixels = image_ops.random_resized_crop(pixels, 24, [1, 2])
  np.testing.assert_array_equal(from_png.numpy(), from_pixels.numpy())
  np.testing.assert_allclose(from_png.numpy(), a.numpy(), atol=2)


def test_random_resized_crop_matches_manual_crop_and_resize():
  """Window from crop_window, then tf.image.resize with antialias, whether the crop shrinks
  or grows (bilinear skips the antialiasing kernel when nothing shrinks: same numbers)."""
  pixels = tf.constant(_pixels(120, 160, seed=7), tf.float32)
  sides = set()
  for s in range(12):
    y, x, h, w = image_ops.crop_window(tf.shape(pixels), [s, 1]).numpy()
    expected = tf.image.resize(pixels[y:y + h, x:x + w], [48, 48], "bilinear", antialias=True)
    got = image_ops.random_resized_crop(pixels, 48, [s, 1])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-3)
    sides.add(max(h, w) > 48)
  assert sides == {True, False}


def test_random_flip():
  image = tf.constant(RGB)
  flipped = 0
  for s in range(40):
    out = image_ops.random_flip(image, [s, 0]).numpy()
    np.testing.assert_array_equal(out, image_ops.random_flip(image, [s, 0]).numpy())
    if (out == RGB[:, ::-1]).all():
      flipped += 1
    else:
      np.testing.assert_array_equal(out, RGB)
  assert 8 <= flipped <= 32


def test_resize_center_crop_geometry():
  # Shorter side already `size`: no resampling, the crop offset is round-half-even.
  cols = np.broadcast_to(np.arange(33, dtype=np.uint8)[None, :, None], (30, 33, 3))
  out = image_ops.resize_center_crop(tf.constant(cols), 30).numpy()
  assert out.shape == (30, 30, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0, :, 0], np.arange(2, 32), atol=1e-3)  # round(1.5) = 2
  # A portrait image of three horizontal bands keeps the middle one.
  bands = np.zeros((90, 30, 3), np.uint8)
  bands[:30, :, 0], bands[30:60, :, 1], bands[60:, :, 2] = 255, 255, 255
  out = image_ops.resize_center_crop(_png(bands), 30).numpy()
  np.testing.assert_allclose(out, np.broadcast_to([0, 255, 0], (30, 30, 3)), atol=1e-3)
  # Resized landscape: 60 x 150 -> 24 x 60, crop columns [18, 42); a centred disc stays
  # centred (the output is symmetric) and its pixels are the middle of the resized image.
  yy, xx = np.mgrid[:60, :150]
  disc = (((yy - 29.5) ** 2 + (xx - 74.5) ** 2) < 20 ** 2) * 255
  image = np.repeat(disc[..., None], 3, -1).astype(np.uint8)
  out = image_ops.resize_center_crop(image, 24).numpy()
  np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-2)
  resized = tf.image.resize(image.astype(np.float32), [24, 60], "bicubic", antialias=True)
  np.testing.assert_allclose(out, np.clip(resized.numpy()[:, 18:42], 0, 255), atol=1e-3)
  assert out[12, 12, 0] > 200 and out[0, 0, 0] < 20


def test_normalize():
  pixels = tf.constant([[0, 255, 128]], tf.uint8)[..., None] * tf.ones([1, 1, 3], tf.uint8)
  pixel = np.array([0.0, 255.0, 128.0])[:, None]
  for kind, mean, std in [("clip", image_ops.CLIP_MEAN, image_ops.CLIP_STD),
                          ("imagenet", image_ops.IMAGENET_MEAN, image_ops.IMAGENET_STD)]:
    out = image_ops.normalize(pixels, kind).numpy()[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (pixel / 255 - np.array(mean)) / np.array(std), rtol=1e-6)
  out = image_ops.normalize(pixels, "minus_one_to_one").numpy()[0]
  np.testing.assert_allclose(out[:, 0], [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
  np.testing.assert_allclose(image_ops.CLIP_MEAN[0], 0.48145466)
  np.testing.assert_allclose(image_ops.normalize(tf.fill([1, 3], 255.0 * 0.48145466), "clip")
                             .numpy()[0, 0], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"'bogus'.*clip.*imagenet.*minus_one_to_one"):
    image_ops.normalize(pixels, "bogus")


def test_inside_tf_data_map():
  """Mixed formats through a tf.data pipeline equal the eager results; undecodable bytes are
  dropped by ignore_errors."""
  encoded = [_jpeg(_pixels(40, 60, seed=4)), _png(_pixels(50, 30, seed=5)), b"corrupt",
             _jpeg(_pixels(30, 30, c=1, seed=6)), _palette_png(INDEX, PALETTE), _bmp24(RGB)]

  def train(i, data):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split([i, 9], 2))
    image = image_ops.random_resized_crop(data, 16, crop_seed)
    image = image_ops.random_flip(image, flip_seed)
    return {"image": image_ops.normalize(image, "clip"),
            "eval": image_ops.normalize(image_ops.resize_center_crop(data, 16), "clip"),
            "format": image_ops.image_format(data), "channels": image_ops.native_channels(data)}

  ds = tf.data.Dataset.from_tensor_slices(encoded).enumerate().map(
      train, num_parallel_calls=2, deterministic=True)
  ds = ds.apply(tf.data.experimental.ignore_errors())
  got = list(ds.as_numpy_iterator())
  assert len(got) == len(encoded) - 1
  assert [g["format"] for g in got] == [1, 2, 1, 2, 4]
  assert [g["channels"] for g in got] == [3, 3, 1, 3, 3]
  eager = [train(tf.constant(i, tf.int64), e) for i, e in enumerate(encoded) if i != 2]
  for g, e in zip(got, eager):
    assert g["image"].shape == (16, 16, 3) and g["eval"].shape == (16, 16, 3)
    np.testing.assert_allclose(g["image"], e["image"].numpy(), atol=1e-5)
    np.testing.assert_allclose(g["eval"], e["eval"].numpy(), atol=1e-5)

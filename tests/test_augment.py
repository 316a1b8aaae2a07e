"""data.augment: shapes and ranges, determinism per example, identities of each op."""

import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import augment, pipeline, shapes
from contrastive_jax.data.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer(48)
SIZE = 32
NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def _examples(indices, seed=0, **views):
  fn = augment.view_features(TOKENIZER, seed=seed, **views)
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  ds = ds.map(shapes.example_fn("train", seed=0, image_size=SIZE))
  ds = ds.map(lambda ex: dict(fn(ex), image=ex["image"], caption=ex["caption"]))
  return list(ds.as_numpy_iterator())


def test_keys_shapes_dtypes_and_ranges():
  (ex,) = _examples([3], ssl=dict(num=3), local=dict(num=2, size=16, flip=False),
                    text=dict(num=4))
  assert ex["views"].shape == (3, SIZE, SIZE, 3) and ex["views"].dtype == np.float32
  assert ex["local_views"].shape == (2, 16, 16, 3) and ex["local_views"].dtype == np.float32
  assert ex["text_aug"].shape == (4, 48) and ex["text_aug"].dtype == np.int32
  assert ex["text_aug_mask"].shape == (4, 48) and ex["text_aug_mask"].dtype == bool
  for key in ("views", "local_views"):
    assert ex[key].min() >= -1.0 and ex[key].max() <= 1.0
    assert ex[key].std() > 0.05
  assert ex["text_aug_mask"].sum(axis=1).min() >= 2  # never empty: a word + EOT


def test_deterministic_per_index_whatever_the_order():
  views = dict(ssl=dict(num=2), local=dict(num=2), text=dict(num=2))
  a = _examples([0, 1, 2, 3, 4], **views)
  b = _examples([4, 2], **views)
  for key in ("views", "local_views", "text_aug", "text_aug_mask"):
    np.testing.assert_array_equal(a[4][key], b[0][key])
    np.testing.assert_array_equal(a[2][key], b[1][key])


def test_views_differ_between_views_examples_and_seeds():
  a = _examples([0, 1], ssl=dict(num=2), local=dict(num=2, flip=False, scale=(0.6, 1.0)))
  other_seed = _examples([0], seed=1, ssl=dict(num=2))
  for key in ("views", "local_views"):
    for ex in a:
      assert np.abs(ex[key][0] - ex[key][1]).mean() > 1e-2, key
  assert np.abs(a[0]["views"] - other_seed[0]["views"]).mean() > 1e-2
  # The ssl and local groups draw from different streams.
  assert np.abs(a[0]["views"][0] - a[0]["local_views"][0]).mean() > 1e-2


def test_identity_spec_reproduces_the_pipeline_image():
  (ex,) = _examples([5], local=dict(num=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                                    **NO_COLOUR))
  image = pipeline.scale_image(tf.constant(ex["image"])).numpy()
  for view in ex["local_views"]:
    np.testing.assert_allclose(view, image, atol=1e-5)


def test_flip_gives_the_image_or_its_mirror_both_occurring():
  exs = _examples(range(6), ssl=dict(num=2, scale=(1.0, 1.0), ratio=(1.0, 1.0), **NO_COLOUR))
  flipped = []
  for ex in exs:
    image = pipeline.scale_image(tf.constant(ex["image"])).numpy()
    for view in ex["views"]:
      same = np.abs(view - image).max() < 1e-5
      mirror = np.abs(view - image[:, ::-1]).max() < 1e-5
      assert same or mirror
      flipped.append(mirror and not same)
  assert any(flipped) and not all(flipped)


def test_small_crop_zooms_into_a_part_of_the_image():
  # A crop of area fraction 0.25 at aspect 1 is a 2x zoom of a quarter of the image.
  (ex,) = _examples([7], local=dict(num=1, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False,
                                    **NO_COLOUR))
  image = tf.cast(ex["image"], tf.float32)[None] / 127.5 - 1.0
  view = ex["local_views"][0]
  best = min(
      np.abs(tf.image.crop_and_resize(image, [[y / SIZE, x / SIZE, (y + 16) / SIZE,
                                                (x + 16) / SIZE]], [0], [SIZE, SIZE])[0]
             - view).mean()
      for y in range(17) for x in range(17))
  assert best < 0.3 * np.abs(image[0].numpy() - view).mean()


def test_grayscale_and_colour_ops():
  (ex,) = _examples([2], ssl=dict(num=2, gray_p=1.0, blur_p=0.0))
  views = ex["views"]
  np.testing.assert_allclose(views[..., 0], views[..., 1], atol=1e-6)
  np.testing.assert_allclose(views[..., 0], views[..., 2], atol=1e-6)
  image = tf.random.stateless_uniform([8, 8, 3], seed=[1, 2])
  np.testing.assert_allclose(augment.color_jitter(image, [0, 0], (0.0, 0.0, 0.0, 0.0)), image)
  blurred = augment.gaussian_blur(image, 1.0, 1)
  np.testing.assert_allclose(tf.reduce_mean(blurred), tf.reduce_mean(image), atol=2e-2)
  assert float(tf.math.reduce_std(blurred)) < float(tf.math.reduce_std(image))
  const = tf.fill([8, 8, 3], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(const, 2.0, 2), const, atol=1e-6)


def test_text_augmentation_rules():
  caption = tf.constant("A large red circle, at the top left")
  key = tf.constant([1, 2], tf.int64)
  clean = augment.TextSpec(dropout=0.0, stopword_p=0.0, clean=True)
  out = augment.augment_caption(caption, key, clean).numpy()
  assert out == b"a large red circle at the top left"
  no_stop = augment.TextSpec(dropout=0.0, stopword_p=1.0, clean=True)
  assert augment.augment_caption(caption, key, no_stop).numpy() == b"large red circle top left"
  drop_all = augment.TextSpec(dropout=1.0, stopword_p=0.0, clean=False)
  assert augment.augment_caption(caption, key, drop_all).numpy() == caption.numpy()
  half = augment.TextSpec(dropout=0.5, stopword_p=0.0, clean=True)
  outs = {augment.augment_caption(caption, tf.constant([k, 0], tf.int64), half).numpy()
          for k in range(8)}
  assert len(outs) > 2
  words = set(b"a large red circle at the top left".split())
  assert all(set(o.split()) <= words for o in outs)


def test_text_views_tokenize_like_the_caption():
  (ex,) = _examples([1], text=dict(num=2, dropout=0.0, stopword_p=0.0, clean=False))
  tokens, mask = TOKENIZER.tokenize(tf.constant(ex["caption"]))
  for v in range(2):
    np.testing.assert_array_equal(ex["text_aug"][v], tokens.numpy())
    np.testing.assert_array_equal(ex["text_aug_mask"][v], mask.numpy())


def test_unknown_field_and_empty_group_fail():
  with pytest.raises(ValueError, match="unknown fields"):
    augment.view_features(TOKENIZER, seed=0, ssl=dict(num=2, colour=0.4))
  with pytest.raises(ValueError, match="at least 1"):
    augment.view_features(TOKENIZER, seed=0, local=dict(num=0))


# ---- crop boxes, multi-crop, solarize, position keys (image-only SSL) -------------------------

def _reference_crop(image, box, size):
  """Bilinear samples of ``image`` [H, W, C] at the half-pixel bin centres of ``box``
  ``(x0, y0, x1, y1)`` (edge pixels clamped), in numpy."""
  h, w = image.shape[:2]
  x0, y0, x1, y1 = box
  t = (np.arange(size) + 0.5) / size

  def axis(lo, hi, n):
    p = np.clip((lo + t * (hi - lo)) * n - 0.5, 0.0, n - 1)
    i0 = np.floor(p).astype(int)
    return i0, np.minimum(i0 + 1, n - 1), (p - i0)

  ya, yb, fy = axis(y0, y1, h)
  xa, xb, fx = axis(x0, x1, w)
  fx = fx[None, :, None]
  top = image[ya][:, xa] * (1 - fx) + image[ya][:, xb] * fx
  bottom = image[yb][:, xa] * (1 - fx) + image[yb][:, xb] * fx
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def _image(index=4):
  return shapes.make_example(index, image_size=SIZE)["image"]


def _views_and_boxes(image, group="ssl", index=0, seed=0, **fields):
  spec = augment.group_spec(group, fields)
  views, boxes = augment.image_views_and_boxes(image, index, seed=seed, group=group, spec=spec)
  return views.numpy(), boxes.numpy()


def _eager_features(index, **views):
  fn = augment.view_features(None, seed=0, **views)
  out = fn({"image": _image(index), "index": tf.constant(index, tf.int64)})
  return {k: v.numpy() for k, v in out.items()}


def test_boxes_reproduce_the_views_flipped_or_not():
  image = _image()
  pixels = image.numpy().astype(np.float32) / 127.5 - 1.0
  views, boxes = _views_and_boxes(image, num=8, size=20, scale=(0.1, 1.0), **NO_COLOUR)
  flipped = boxes[:, 0] > boxes[:, 2]
  assert flipped.any() and not flipped.all()
  assert (boxes >= 0.0).all() and (boxes <= 1.0).all() and (boxes[:, 1] < boxes[:, 3]).all()
  for view, box, flip in zip(views, boxes, flipped):
    np.testing.assert_allclose(view, _reference_crop(pixels, box, 20), atol=1e-4)
    mirror = box[[2, 1, 0, 3]]  # the same crop unflipped is the mirror image
    np.testing.assert_allclose(view[:, ::-1], _reference_crop(pixels, mirror, 20), atol=1e-4)
    area = abs(box[2] - box[0]) * (box[3] - box[1])
    assert 0.1 - 1e-6 <= area <= 1.0 + 1e-6
  _, unflipped = _views_and_boxes(image, num=8, flip=False)
  assert (unflipped[:, 0] < unflipped[:, 2]).all()


def test_box_reference_geometry_on_a_pixel_aligned_box():
  # Half-pixel geometry: a box covering pixels [8, 24) of a 32 px image, resized to 16 px,
  # is the exact 2x2 block average (bilinear at the shared corner of each block).
  image = tf.random.stateless_uniform([SIZE, SIZE, 3], seed=[3, 4])
  box = tf.constant([8 / SIZE, 4 / SIZE, 24 / SIZE, 20 / SIZE])
  view = augment.crop_box(image, box, 8).numpy()
  block = image.numpy()[4:20, 8:24].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(view, block, atol=1e-5)


def test_view_boxes_key_and_determinism():
  ex = _eager_features(3, ssl=dict(num=2, boxes=True, size=16))
  assert ex["view_boxes"].shape == (2, 4) and ex["view_boxes"].dtype == np.float32
  _, boxes = _views_and_boxes(_image(3), index=3, num=2, boxes=True, size=16)
  np.testing.assert_allclose(ex["view_boxes"], boxes, atol=1e-6)
  _, again = _views_and_boxes(_image(3), index=3, num=2, boxes=True, size=16)
  np.testing.assert_array_equal(boxes, again)
  _, other = _views_and_boxes(_image(3), index=3, seed=1, num=2, boxes=True, size=16)
  assert np.abs(boxes - other).max() > 1e-3
  no_boxes = _eager_features(3, ssl=dict(num=2, size=16))
  assert "view_boxes" not in no_boxes


def test_multicrop_defaults_size_scale_and_own_stream():
  spec = augment.group_spec("multicrop", dict(size=12))
  assert (spec.num, spec.scale, spec.size) == (6, (0.05, 0.14), 12)
  ex = _eager_features(2, ssl=dict(num=2, scale=(0.05, 0.14), size=12),
                       multicrop=dict(size=12))
  assert ex["crops"].shape == (6, 12, 12, 3) and ex["crops"].dtype == np.float32
  # Independent of the ssl group's draws even with identical specs.
  assert np.abs(ex["crops"][:2] - ex["views"]).mean() > 1e-2
  _, boxes = _views_and_boxes(_image(2), group="multicrop", index=2, size=12)
  areas = np.abs(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  assert (areas >= 0.05 - 1e-6).all() and (areas <= 0.14 + 1e-6).all()
  assert areas.max() - areas.min() > 0.01


def test_solarize():
  x = tf.constant([0.0, 0.2, 0.4999, 0.5, 0.7, 1.0])
  np.testing.assert_allclose(augment.solarize(x), [0.0, 0.2, 0.4999, 0.5, 0.3, 0.0], atol=1e-7)
  image = _image(6)
  identity = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, **NO_COLOUR)
  on, _ = _views_and_boxes(image, num=2, solarize_p=1.0, **identity)
  off, _ = _views_and_boxes(image, num=2, solarize_p=0.0, **identity)
  pixels = image.numpy().astype(np.float32) / 255.0
  want = np.where(pixels >= 0.5, 1.0 - pixels, pixels) * 2.0 - 1.0
  np.testing.assert_allclose(on, np.broadcast_to(want, on.shape), atol=1e-5)
  np.testing.assert_allclose(off, np.broadcast_to(pixels * 2 - 1, off.shape), atol=1e-5)
  assert (pixels >= 0.5).any()  # the check above is not vacuous
  half, _ = _views_and_boxes(image, num=16, solarize_p=0.5, **identity)
  solarized = [np.abs(v - want).max() < 1e-5 for v in half]
  assert any(solarized) and not all(solarized)


def test_views_keyed_by_position_when_present():
  fn = augment.view_features(None, seed=0, ssl=dict(num=1, size=16))
  image = _image(1)
  by_index = fn({"image": image, "index": tf.constant(5, tf.int64)})["views"].numpy()
  same = fn({"image": image, "index": tf.constant(0, tf.int64),
             "position": tf.constant(5, tf.int64)})["views"].numpy()
  other = fn({"image": image, "index": tf.constant(5, tf.int64),
              "position": tf.constant(6, tf.int64)})["views"].numpy()
  np.testing.assert_array_equal(by_index, same)
  assert np.abs(by_index - other).mean() > 1e-2


def test_bad_view_specs_fail():
  with pytest.raises(ValueError, match="only emitted for the ssl group"):
    augment.group_spec("multicrop", dict(boxes=True))
  with pytest.raises(ValueError, match="scale"):
    augment.group_spec("ssl", dict(scale=(0.5, 0.2)))
  with pytest.raises(ValueError, match="solarize_p"):
    augment.group_spec("ssl", dict(solarize_p=1.5))
  with pytest.raises(ValueError, match="unknown group"):
    augment.group_spec("global", {})
  with pytest.raises(ValueError, match="tokenizer"):
    augment.view_features(None, seed=0, text=dict(num=2))

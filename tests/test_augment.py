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

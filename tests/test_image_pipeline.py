"""data.pipeline with the image-only Fashion-MNIST source: batch keys, resume, hosts, evaluation
data, errors. Runs on small synthetic idx files (plus one check on the real data if installed)."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import fashion_mnist as fm
from contrastive_jax.data import pipeline
from contrastive_jax.data.tokenizers import ByteTokenizer
from test_fashion_mnist import NOT_INSTALLED, synthetic, write_split

N_TRAIN, N_TEST, BATCH = 24, 6, 8  # 3 steps per epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fashion")
  write_split(directory, "train", *synthetic(N_TRAIN, 1))
  write_split(directory, "test", *synthetic(N_TEST, 2), gz=False)
  return str(directory)


def make_config(data_dir, views=None, **data):
  config = ml_collections.ConfigDict()
  config.batch_size = BATCH
  config.data = {**dict(source="fashion_mnist", seed=3, image_size=28, data_dir=data_dir),
                 **data}
  if views is not None:
    config.data.views = views
  return config


def batches(config, steps, start_step=0):
  ds = pipeline.train_dataset(config, start_step=start_step).take(steps)
  return list(pipeline.as_numpy_batches(ds))


VIEWS = dict(ssl=dict(num=2, boxes=True, solarize_p=0.5), multicrop=dict(num=3, size=12))


def scaled(images):
  return np.repeat(images[..., None], 3, axis=-1).astype(np.float32) / 127.5 - 1.0


def test_batch_keys_shapes_and_contents(data_dir):
  (batch,) = batches(make_config(data_dir, VIEWS), 1)
  want = {"image": ((BATCH, 28, 28, 3), np.float32), "label": ((BATCH,), np.int32),
          "index": ((BATCH,), np.int64), "views": ((BATCH, 2, 28, 28, 3), np.float32),
          "view_boxes": ((BATCH, 2, 4), np.float32), "crops": ((BATCH, 3, 12, 12, 3), np.float32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
  pipeline.validate_batch(batch, list(want), BATCH)
  images, labels = synthetic(N_TRAIN, 1)
  np.testing.assert_array_equal(batch["image"], scaled(images[batch["index"]]))
  np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
  assert len(set(batch["index"])) == BATCH
  for key in ("views", "crops"):
    assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0
  assert (np.abs(batch["view_boxes"]) <= 1.0).all()
  # Without views the batch is the image-only base.
  (plain,) = batches(make_config(data_dir), 1)
  assert sorted(plain) == ["image", "index", "label"]
  np.testing.assert_array_equal(plain["index"], batch["index"])


def test_epochs_visit_every_image_once_with_new_views(data_dir):
  out = batches(make_config(data_dir, dict(ssl=dict(num=1))), 6)
  index = np.stack([b["index"] for b in out]).reshape(2, N_TRAIN)
  for epoch in index:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N_TRAIN))
  assert not np.array_equal(index[0], index[1])
  # Augmentations are keyed by the stream position: an image's views change between epochs.
  views = np.concatenate([b["views"][:, 0] for b in out]).reshape(2, N_TRAIN, 28, 28, 3)
  first = views[0][np.argsort(index[0])]
  second = views[1][np.argsort(index[1])]
  assert all(np.abs(a - b).mean() > 1e-3 for a, b in zip(first, second))


def test_resume_equals_skipping(data_dir):
  config = make_config(data_dir, dict(ssl=dict(num=1, boxes=True), multicrop=dict(num=1)))
  full = batches(config, 4)  # crosses an epoch boundary
  resumed = batches(config, 2, start_step=2)
  assert len(resumed) == 2
  for a, b in zip(full[2:], resumed):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_hosts_read_disjoint_halves_of_each_global_batch(data_dir, monkeypatch):
  config = make_config(data_dir, dict(ssl=dict(num=1, boxes=True)))
  single = batches(config, 3)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  hosts = []
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    hosts.append(batches(config, 3))
  for step in range(3):
    a, b = hosts[0][step], hosts[1][step]
    assert a["index"].shape == (BATCH // 2,)
    assert not set(a["index"]) & set(b["index"])
    for key in single[step]:  # host 0 then host 1 = the one-host global batch
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), single[step][key])


def test_other_image_size_resizes_before_the_views(data_dir):
  (batch,) = batches(make_config(data_dir, dict(ssl=dict(num=1)), image_size=32), 1)
  assert batch["image"].shape == (BATCH, 32, 32, 3)
  assert batch["views"].shape == (BATCH, 1, 32, 32, 3)
  images, _ = synthetic(N_TRAIN, 1)
  grey = images[batch["index"]][..., None].astype(np.float32)
  want = np.round(tf.image.resize(grey, [32, 32], antialias=True).numpy()) / 127.5 - 1.0
  np.testing.assert_allclose(batch["image"], np.repeat(want, 3, -1), atol=1.01 / 127.5)
  assert np.abs(batch["image"] - np.repeat(want, 3, -1)).mean() < 1e-3
  with pytest.raises(ValueError, match="image_size"):
    pipeline.train_dataset(make_config(data_dir, image_size=4))


def test_errors_name_the_problem(data_dir, tmp_path):
  config = make_config(data_dir)
  config.data.source = "imagenet"
  with pytest.raises(ValueError, match=r"config.data.source='imagenet'.*fashion_mnist"):
    pipeline.train_dataset(config)
  with pytest.raises(ValueError, match="image-only"):
    pipeline.train_dataset(make_config(data_dir, subcaptions=dict(num=2)))
  with pytest.raises(ValueError, match="image-only"):
    pipeline.train_dataset(make_config(data_dir, dict(text=dict(num=2))))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    pipeline.train_dataset(make_config(str(tmp_path)))
  with pytest.raises(ValueError, match="num_examples=30"):
    pipeline.train_dataset(make_config(data_dir, num_examples=30))


def test_finite_fashion_training_set(data_dir):
  out = batches(make_config(data_dir, num_examples=10), 3)
  index = np.concatenate([b["index"] for b in out])
  for epoch in (index[:10], index[10:20]):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert not np.array_equal(index[:10], index[10:20])


def test_shapes_image_only_and_finite():
  data = dict(source="shapes", seed=0, image_size=32, min_objects=1, max_objects=1,
              num_examples=BATCH, views=dict(ssl=dict(num=1, flip=False)))
  config = ml_collections.ConfigDict(dict(batch_size=BATCH, data=data))
  steps = batches(config, 2)  # no tokenizer: image-only batches
  assert sorted(steps[0]) == ["image", "index", "label", "views"]
  for b in steps:  # each step is one epoch of the 8 scenes, a different order each time
    np.testing.assert_array_equal(np.sort(b["index"]), np.arange(BATCH))
    assert (b["label"] >= 0).all()  # single-object scenes
  assert not np.array_equal(steps[0]["index"], steps[1]["index"])
  first, second = (b["index"].argsort() for b in steps)
  np.testing.assert_array_equal(steps[0]["image"][first], steps[1]["image"][second])
  assert np.abs(steps[0]["views"][first] - steps[1]["views"][second]).mean() > 1e-2
  # The memory bank of the kNN evaluator is this training set.
  bank = list(pipeline.image_eval_dataset(config.data, split="train").as_numpy_iterator())
  assert [int(ex["index"]) for ex in bank] == list(range(BATCH))
  np.testing.assert_array_equal(np.stack([ex["image"] for ex in bank]),
                                steps[0]["image"][first])
  # With a tokenizer, the same scenes come with their captions.
  (with_text,) = list(pipeline.as_numpy_batches(
      pipeline.train_dataset(config, ByteTokenizer(16)).take(1)))
  assert {"text", "text_mask"} <= set(with_text)
  np.testing.assert_array_equal(with_text["image"], steps[0]["image"])


def test_image_eval_dataset_fashion(data_dir):
  data = make_config(data_dir).data
  examples = list(pipeline.image_eval_dataset(data, split="test").as_numpy_iterator())
  images, labels = synthetic(N_TEST, 2)
  assert len(examples) == N_TEST
  for i, ex in enumerate(examples):
    np.testing.assert_array_equal(ex["image"], scaled(images[i]))
    assert ex["label"] == labels[i] and ex["label"].dtype == np.int32 and ex["index"] == i
  train = pipeline.image_eval_dataset(data, split="train", num_examples=5)
  assert [int(ex["index"]) for ex in train.as_numpy_iterator()] == list(range(5))
  with pytest.raises(ValueError, match="split"):
    pipeline.image_eval_dataset(data, split="val")


def test_image_eval_dataset_shapes():
  data = ml_collections.ConfigDict(dict(source="shapes", seed=0, image_size=32))
  ds = pipeline.image_eval_dataset(data, split="test", num_examples=16, single_object=True)
  examples = list(ds.as_numpy_iterator())
  assert 0 < len(examples) < 16 and all(ex["label"] >= 0 for ex in examples)
  assert examples[0]["image"].shape == (32, 32, 3) and sorted(examples[0]) == [
      "image", "index", "label"]
  # The same images as the image-text evaluation data.
  ref = pipeline.eval_dataset(data, ByteTokenizer(16), split="test", single_object=True,
                              num_examples=16)
  for ex, want in zip(examples, ref.as_numpy_iterator()):
    np.testing.assert_array_equal(ex["image"], want["image"])
    assert ex["label"] == want["label"]
  with pytest.raises(ValueError, match="num_examples"):
    pipeline.image_eval_dataset(data, split="train")


@pytest.mark.skipif(not fm.available(fm.DEFAULT_DIR), reason=NOT_INSTALLED)
def test_real_fashion_mnist_batches():
  config = make_config(None, dict(ssl=dict(num=2)))
  (batch,) = batches(config, 1)
  assert batch["image"].shape == (BATCH, 28, 28, 3) and batch["views"].shape[:2] == (BATCH, 2)
  assert batch["index"].max() < fm.SPLITS["train"] and (0 <= batch["label"]).all()
  test = pipeline.image_eval_dataset(config.data, split="test", num_examples=5)
  assert [int(ex["label"]) for ex in test.as_numpy_iterator()] == [9, 2, 1, 1, 6]

"""data.fashion_mnist: idx parsing and its errors, the real files, the per-epoch permutations."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import fashion_mnist as fm

NOT_INSTALLED = "Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist"
real_data = pytest.mark.skipif(not fm.available(fm.DEFAULT_DIR), reason=NOT_INSTALLED)


def write_idx(path, array: np.ndarray, *, magic=None, gz=None, cut=0, extra=b""):
  """Writes ``array`` (uint8) as an idx file; ``gz`` defaults to ``path`` ending in .gz."""
  array = np.asarray(array, np.uint8)
  magic = (0x800 + array.ndim) if magic is None else magic
  data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  data = data + array.tobytes() + extra
  data = data[:len(data) - cut]
  if gz if gz is not None else str(path).endswith(".gz"):
    data = gzip.compress(data)
  with open(path, "wb") as f:
    f.write(data)


def write_split(directory, split, images, labels, gz=True):
  prefix = {"train": "train", "test": "t10k"}[split]
  ext = ".gz" if gz else ""
  write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
  write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)


def synthetic(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, (n,), dtype=np.uint8))


@pytest.fixture
def data_dir(tmp_path):
  """Train (13 images, gzipped) and test (5 images, plain) idx files."""
  write_split(tmp_path, "train", *synthetic(13, 1), gz=True)
  write_split(tmp_path, "test", *synthetic(5, 2), gz=False)
  return str(tmp_path)


def test_parses_gzipped_and_plain_files(data_dir):
  for split, n, seed in (("train", 13, 1), ("test", 5, 2)):
    images, labels = fm.load(split, data_dir)
    want_images, want_labels = synthetic(n, seed)
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28)
    assert labels.dtype == np.int32 and labels.shape == (n,)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  assert fm.available(data_dir)
  os.remove(os.path.join(data_dir, "t10k-labels-idx1-ubyte"))
  assert not fm.available(data_dir)


def test_cached_per_file_and_reloaded_when_it_changes(data_dir):
  a = fm.load("train", data_dir)
  b = fm.load("train", data_dir)
  assert a[0] is b[0]
  assert not a[0].flags.writeable and not a[1].flags.writeable
  write_split(data_dir, "train", *synthetic(4, 3))
  images, _ = fm.load("train", data_dir)
  np.testing.assert_array_equal(images, synthetic(4, 3)[0])


def test_data_dir_argument_then_environment_variable(data_dir, tmp_path_factory, monkeypatch):
  other = str(tmp_path_factory.mktemp("other"))
  write_split(other, "train", *synthetic(3, 4))
  monkeypatch.setenv("FASHION_MNIST_DIR", other)
  assert fm.load("train")[0].shape[0] == 3
  assert fm.load("train", data_dir)[0].shape[0] == 13


def test_missing_file_names_it_and_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte") as err:
    fm.load("train", str(tmp_path))
  assert "apt-get install dataset-fashion-mnist" in str(err.value)
  assert str(tmp_path) in str(err.value)
  with pytest.raises(ValueError, match="split"):
    fm.load("validation", str(tmp_path))


@pytest.mark.parametrize("bad, message", [
    (dict(magic=0x00000801), "bad magic number 0x00000801"),
    (dict(cut=5), "truncated"),
    (dict(extra=b"\0"), "trailing bytes"),
])
def test_bad_images_file_errors_name_the_file(data_dir, bad, message):
  path = os.path.join(data_dir, "t10k-images-idx3-ubyte")
  write_idx(path, synthetic(5, 2)[0], **bad)
  with pytest.raises(fm.IdxFormatError, match=message) as err:
    fm.load("test", data_dir)
  assert path in str(err.value)


def test_other_format_errors(data_dir):
  images_path = os.path.join(data_dir, "t10k-images-idx3-ubyte")
  labels_path = os.path.join(data_dir, "t10k-labels-idx1-ubyte")
  write_idx(images_path, np.zeros((5, 27, 28)))
  with pytest.raises(fm.IdxFormatError, match="dimension 1 is 27; expected 28"):
    fm.load("test", data_dir)
  write_idx(images_path, np.zeros((5, 28, 28)))
  write_idx(labels_path, np.zeros((4,)))
  with pytest.raises(fm.IdxFormatError, match="5 images but .* 4 labels"):
    fm.load("test", data_dir)
  write_idx(labels_path, np.full((5,), 10))
  with pytest.raises(fm.IdxFormatError, match="label 10 is outside"):
    fm.load("test", data_dir)
  write_idx(labels_path, np.zeros((5,)), cut=7, gz=False)  # header cut short
  with pytest.raises(fm.IdxFormatError, match="truncated header"):
    fm.load("test", data_dir)
  with open(labels_path, "wb") as f:
    f.write(gzip.compress(b"\0\0\x08\x01" + bytes(9))[:-6])  # a gzip stream cut short
  with pytest.raises(fm.IdxFormatError, match="gzip") as err:
    fm.load("test", data_dir)
  assert labels_path in str(err.value)


def test_dataset_examples(data_dir):
  images, labels = synthetic(5, 2)
  examples = list(fm.dataset("test", data_dir=data_dir).as_numpy_iterator())
  assert len(examples) == 5
  for i, ex in enumerate(examples):
    assert ex["image"].shape == (28, 28, 3) and ex["image"].dtype == np.uint8
    for c in range(3):
      np.testing.assert_array_equal(ex["image"][..., c], images[i])
    assert ex["label"].dtype == np.int32 and ex["label"] == labels[i]
    assert ex["index"].dtype == np.int64 and ex["index"] == i
  assert len(list(fm.dataset("test", data_dir=data_dir, num_examples=2))) == 2


def _stream(fn, positions):
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(positions, np.int64)).map(fn)
  return list(ds.as_numpy_iterator())


def test_train_example_fn_permutes_every_epoch(data_dir):
  n = 13
  images, labels = synthetic(n, 1)
  exs = _stream(fm.train_example_fn(seed=5, data_dir=data_dir), range(3 * n))
  rows = np.array([ex["index"] for ex in exs]).reshape(3, n)
  for epoch in rows:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))  # each epoch: every row once
  assert len({tuple(r) for r in rows}) == 3  # the epochs are different permutations
  assert not all(np.array_equal(r, np.arange(n)) for r in rows)  # and shuffled
  for p, ex in enumerate(exs):
    assert ex["position"] == p
    np.testing.assert_array_equal(ex["image"][..., 1], images[ex["index"]])
    assert ex["label"] == labels[ex["index"]]
  # Stateless: any position alone gives the same example, for the same seed only.
  again = _stream(fm.train_example_fn(seed=5, data_dir=data_dir), [2 * n + 4, 7])
  assert again[0]["index"] == rows[2, 4] and again[1]["index"] == rows[0, 7]
  other = _stream(fm.train_example_fn(seed=6, data_dir=data_dir), range(n))
  assert [ex["index"] for ex in other] != list(rows[0])
  # A finite subset: the first 4 rows, permuted every epoch.
  subset = _stream(fm.train_example_fn(seed=5, data_dir=data_dir, num_examples=4), range(8))
  sub_rows = np.array([ex["index"] for ex in subset]).reshape(2, 4)
  for epoch in sub_rows:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(4))
  with pytest.raises(ValueError, match="has 13 images"):
    fm.train_example_fn(seed=5, data_dir=data_dir, num_examples=14)


@real_data
def test_real_files():
  train_images, train_labels = fm.load("train")
  test_images, test_labels = fm.load("test")
  assert train_images.shape == (fm.SPLITS["train"], 28, 28) == (60000, 28, 28)
  assert test_images.shape == (fm.SPLITS["test"], 28, 28) == (10000, 28, 28)
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1000] * 10)
  # The first labels of each file (ankle boot, T-shirt/top, ...) and the well-known
  # normalisation statistics of the training pixels (mean 0.2860, std 0.3530).
  np.testing.assert_array_equal(train_labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  np.testing.assert_array_equal(test_labels[:5], [9, 2, 1, 1, 6])
  pixels = train_images.astype(np.float64) / 255.0
  assert abs(pixels.mean() - 0.2860) < 5e-4 and abs(pixels.std() - 0.3530) < 5e-4
  assert len(fm.CLASS_NAMES) == 10 and fm.CLASS_NAMES[9] == "Ankle boot"

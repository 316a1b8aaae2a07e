"""Fashion-MNIST (Xiao et al., 2017) from the idx files of the Debian ``dataset-fashion-mnist``.

The four (gzipped or plain) idx files live in :data:`DEFAULT_DIR`, or in the directory named by
the ``FASHION_MNIST_DIR`` environment variable, or in a ``data_dir`` argument (which wins):

  ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``   (split ``"train"``)
  ``t10k-images-idx3-ubyte[.gz]``,  ``t10k-labels-idx1-ubyte[.gz]``    (split ``"test"``)

Images are 28×28 uint8 grayscale, labels 0..9 over :data:`CLASS_NAMES`. :func:`load` parses them
with numpy (cached per file in-process); :func:`dataset` and :func:`train_example_fn` give raw
examples ``{"image": uint8 [28, 28, 3], "label": int32, "index": int64}`` (grey tiled to three
channels so every model sees RGB; ``index`` is the row in the split).

Training reads an endless stream of *positions*: position ``p`` is row ``j = p mod N`` of epoch
``e = p // N`` under a stateless per-epoch permutation (``tf.random.experimental.index_shuffle``
keyed by ``(seed, e)``), so any host, resumed at any step, reads exactly the example the
uninterrupted run would have read, every epoch visits every row once, and epochs differ.
"""

from __future__ import annotations

import gzip
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

__all__ = ["CLASS_NAMES", "DEFAULT_DIR", "IMAGE_SIZE", "IdxFormatError", "SPLITS", "available",
           "data_dir_of", "dataset", "epoch_seed", "load", "parse_idx", "shuffled_row",
           "train_example_fn"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": 60000, "test": 10000}
IMAGE_SIZE = 28

_PREFIX = {"train": "train", "test": "t10k"}
# idx magic: two zero bytes, the element type (0x08: uint8), the number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist`, or point "
                 f"${ENV_VAR} / config.data.data_dir at a directory holding the idx files")
_ALG = "philox"
_STREAM = 0xFA5_0001  # separates the epoch permutations from other streams of the same seed

_cache: Dict[Tuple[str, int, int], np.ndarray] = {}
_cache_lock = threading.Lock()


class IdxFormatError(ValueError):
  """An idx file whose header or length is not what Fashion-MNIST needs."""


def data_dir_of(data_dir: Optional[str] = None) -> str:
  """The directory read: ``data_dir``, else ``$FASHION_MNIST_DIR``, else :data:`DEFAULT_DIR`."""
  return data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown Fashion-MNIST split {split!r}; known: {sorted(SPLITS)}.")


def _find(directory: str, name: str) -> Optional[str]:
  for candidate in (name + ".gz", name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _path(directory: str, name: str) -> str:
  path = _find(directory, name)
  if path is None:
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {directory!r}; {_INSTALL_HINT}.")
  return path


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\x1f\x8b":  # not gzipped (whatever the name says)
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({e}).") from e


def parse_idx(path: str, *, magic: int, dims: Tuple[Optional[int], ...]) -> np.ndarray:
  """Parses one idx file of uint8 elements into an array (uncached).

  Args:
    path: the (gzipped or plain) file.
    magic: the expected magic number (``0x803``: 3-d uint8, ``0x801``: 1-d uint8).
    dims: the expected dimensions, ``None`` where any size is allowed (the count).

  Returns:
    uint8 array of shape ``dims`` (with the file's sizes), read-only.

  Raises:
    IdxFormatError naming ``path`` and what is wrong.
  """
  data = _read_bytes(path)
  ndim = len(dims)
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(f"{path}: truncated header ({len(data)} bytes; an idx file of "
                         f"{ndim} dimensions needs {header}).")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise IdxFormatError(f"{path}: bad magic number 0x{found:08x}; expected 0x{magic:08x} "
                         f"(uint8, {ndim} dimension{'s' * (ndim > 1)}).")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  for axis, (got, want) in enumerate(zip(shape, dims)):
    if want is not None and got != want:
      raise IdxFormatError(f"{path}: dimension {axis} is {got}; expected {want} "
                           f"(header dims {shape}).")
  size = int(np.prod(shape))
  body = len(data) - header
  if body != size:
    what = "truncated" if body < size else "has trailing bytes"
    raise IdxFormatError(f"{path}: {what}: {body} bytes of data after the header, but its "
                         f"dims {shape} need {size}.")
  array = np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape)
  array.setflags(write=False)
  return array


def _cached_parse(path: str, **kwargs) -> np.ndarray:
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
  with _cache_lock:
    if key not in _cache:
      _cache[key] = parse_idx(path, **kwargs)
    return _cache[key]


def load(split: str, data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
  """One split as numpy arrays (parsed once per file and process).

  The counts must agree between the images and labels files but are not required to be the
  official :data:`SPLITS` sizes (so a subset in the same format loads too).

  Args:
    split: ``"train"`` or ``"test"`` (the ``t10k`` files).
    data_dir: directory of the idx files (default: see :func:`data_dir_of`).

  Returns:
    ``(images, labels)``: uint8 ``[N, 28, 28]`` and int32 ``[N]`` (read-only).

  Raises:
    FileNotFoundError: a file is missing (the message says how to install the data).
    IdxFormatError: a file has a bad header, a wrong size or labels outside 0..9.
  """
  _check_split(split)
  directory = data_dir_of(data_dir)
  prefix = _PREFIX[split]
  images_path = _path(directory, f"{prefix}-images-idx3-ubyte")
  labels_path = _path(directory, f"{prefix}-labels-idx1-ubyte")
  images = _cached_parse(images_path, magic=_IMAGES_MAGIC, dims=(None, IMAGE_SIZE, IMAGE_SIZE))
  labels = _cached_parse(labels_path, magic=_LABELS_MAGIC, dims=(None,))
  if images.shape[0] != labels.shape[0]:
    raise IdxFormatError(f"{images_path} holds {images.shape[0]} images but {labels_path} "
                         f"holds {labels.shape[0]} labels.")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise IdxFormatError(f"{labels_path}: label {int(labels.max())} is outside "
                         f"0..{len(CLASS_NAMES) - 1}.")
  out = labels.astype(np.int32)
  out.setflags(write=False)
  return images, out


def available(data_dir: Optional[str] = None) -> bool:
  """Whether all four idx files are present (their contents are not checked)."""
  directory = data_dir_of(data_dir)
  return all(_find(directory, f"{_PREFIX[s]}-{kind}") is not None
             for s in SPLITS for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def _to_example(image, label, index):
  image = tf.tile(tf.expand_dims(image, -1), [1, 1, 3])
  return {"image": tf.ensure_shape(image, [IMAGE_SIZE, IMAGE_SIZE, 3]),
          "label": tf.cast(label, tf.int32), "index": tf.cast(index, tf.int64)}


def dataset(split: str, *, data_dir: Optional[str] = None,
            num_examples: Optional[int] = None) -> tf.data.Dataset:
  """The split's raw examples in file order (unbatched; see the module docstring).

  Args:
    split: ``"train"`` or ``"test"``.
    data_dir: directory of the idx files.
    num_examples: the first ``num_examples`` rows only (None: all).
  """
  images, labels = load(split, data_dir)
  if num_examples is not None:
    if num_examples < 0:
      raise ValueError(f"num_examples={num_examples} must be >= 0.")
    images, labels = images[:num_examples], labels[:num_examples]
  indices = np.arange(images.shape[0], dtype=np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images, labels, indices))
  return ds.map(_to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def epoch_seed(seed: int, epoch) -> tf.Tensor:
  """The stateless seed ``[2]`` of one epoch's permutation."""
  base = tf.constant([seed, _STREAM], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64), alg=_ALG)


def shuffled_row(position, num_rows: int, seed: int) -> tf.Tensor:
  """Row of a finite set read at stream ``position``: ``index_shuffle(p mod N,
  epoch_seed(seed, p // N), N − 1)`` (int64 scalar), a fresh permutation every epoch.

  Any finite training set can be streamed this way (the pipeline uses it for a finite
  shapes set too).
  """
  position = tf.cast(position, tf.int64)
  return tf.random.experimental.index_shuffle(position % num_rows,
                                              epoch_seed(seed, position // num_rows),
                                              tf.constant(num_rows - 1, tf.int64))


def train_example_fn(*, seed: int, data_dir: Optional[str] = None,
                     num_examples: Optional[int] = None):
  """The map function ``int64 position -> raw training example`` (for a ``tf.data`` map).

  Position ``p`` reads row :func:`shuffled_row` ``(p, N, seed)``. The example also carries
  ``position`` (int64, = ``p``), which keys its augmentations, so an image gets new views
  every epoch while ``index`` stays its row in the split.

  Args:
    seed: the data seed (picks the permutations).
    data_dir: directory of the idx files.
    num_examples: train on the first ``num_examples`` rows only (None: all ``N``).
  """
  images, labels = load("train", data_dir)
  n = images.shape[0]
  if num_examples is not None:
    if not 0 < num_examples <= n:
      raise ValueError(f"num_examples={num_examples}; the Fashion-MNIST train split in "
                       f"{data_dir_of(data_dir)!r} has {n} images.")
    n = num_examples
  if n == 0:
    raise IdxFormatError(f"The Fashion-MNIST train split in {data_dir_of(data_dir)!r} is empty.")
  images_t = tf.constant(images[:n])
  labels_t = tf.constant(labels[:n])

  def fn(position):
    position = tf.cast(position, tf.int64)
    row = shuffled_row(position, n, seed)
    example = _to_example(tf.gather(images_t, row), tf.gather(labels_t, row), row)
    example["position"] = position
    return example

  return fn

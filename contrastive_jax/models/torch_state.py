"""Reads PyTorch weight files as numpy arrays, without torch and without running pickled code.

:func:`load_state_dict` reads

* ``.npz`` files (``numpy.savez``; no pickles);
* ``.safetensors`` files (8-byte little-endian header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes);
* ``torch.save`` zip checkpoints (``.pt`` / ``.pth`` / ``.bin``: ``<archive>/data.pkl`` plus one
  ``<archive>/data/<key>`` file per storage). ``data.pkl`` is read by a restricted unpickler
  that only resolves the handful of globals a tensor checkpoint needs (``OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` and friends, the ``torch.*Storage`` dtypes, TorchScript's
  list builders); anything else, e.g. ``os.system``, raises ``pickle.UnpicklingError`` naming
  the global, before anything is called;
* TorchScript archives such as OpenAI's ``ViT-B-32.pt`` (``torch.jit.save``: same layout plus
  ``code/`` and ``constants.pkl``): ``data.pkl`` holds the module tree as ``__torch__.*``
  objects; they are rebuilt as inert attribute holders (no code of the archive is read) and
  the tensors found under them are named by their attribute paths (``visual.conv1.weight``),
  which is the module's ``state_dict()`` naming.

bfloat16 tensors become float32 (exact: the 16 bits are the top half of a float32); float16
stays float16; tensors are little-endian copies that own their memory.
"""

from __future__ import annotations

import collections
import json
import pickle
import zipfile
from typing import Any, Dict, Mapping

import numpy as np

# torch storage class name -> (numpy dtype of the stored bytes, is bfloat16).
_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# A state dict nested in a training checkpoint (open_clip saves {"epoch", "state_dict", ...}).
_NESTED_KEYS = ("state_dict", "model", "module")


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
  """uint16 bfloat16 bit patterns -> float32 values (exact)."""
  return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)  # 0-d stays an array


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads the tensors of a ``.safetensors`` file or a torch zip / TorchScript archive.

  Args:
    path: the weight file.

  Returns:
    ``{name: array}`` in file order. For a checkpoint whose top level is a dict holding a
    ``state_dict`` (or ``model``) dict of tensors, that inner dict; non-tensor entries are
    dropped.

  Raises:
    ValueError: unknown or unsupported format (e.g. the pre-1.6 non-zip ``torch.save``).
    pickle.UnpicklingError: ``data.pkl`` references a global outside the allow-list.
  """
  with open(path, "rb") as f:
    head = f.read(8)
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  if head[:4] == b"PK\x03\x04":
    return read_torch_zip(path)
  if head[:1] == b"\x80":
    raise ValueError(f"{path}: a legacy (pre-zip, torch < 1.6) torch.save file, which is "
                     "not supported; re-save it with a recent torch or as .safetensors.")
  try:
    return read_safetensors(path)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: neither a torch zip checkpoint nor a safetensors file.") from e


def is_torchscript(path: str) -> bool:
  """Whether ``path`` is a TorchScript archive (``torch.jit.save``, e.g. OpenAI's CLIP files)."""
  if not zipfile.is_zipfile(path):
    return False
  archive = _Archive(path)
  archive.zip.close()
  return archive.torchscript


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file (``__metadata__`` is skipped)."""
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f"{path}: too short for a safetensors file.")
  n = int.from_bytes(raw[:8], "little")
  try:
    header = json.loads(raw[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: bad safetensors header ({e}).") from e
  data = memoryview(raw)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize or end > len(data):
      raise ValueError(f"{path}: tensor {name!r} byte range [{begin}, {end}) does not hold "
                       f"shape {shape} of {info['dtype']}.")
    x = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    out[name] = bfloat16_to_float32(x) if info["dtype"] == "BF16" else x
  return out


class _Storage:
  """A storage named by ``data.pkl``'s persistent id; its bytes are read on first use."""

  def __init__(self, archive: "_Archive", kind: str, key: str, numel: int):
    self.archive, self.kind, self.key, self.numel = archive, kind, key, numel
    self._array = None

  def array(self) -> np.ndarray:
    if self._array is None:
      dtype = np.dtype(_STORAGES[self.kind]).newbyteorder("<")
      raw = self.archive.read(f"data/{self.key}")
      if len(raw) < self.numel * dtype.itemsize:
        raise ValueError(f"storage {self.key}: {len(raw)} bytes, expected "
                         f"{self.numel} x {dtype.itemsize}.")
      self._array = np.frombuffer(raw, dtype=dtype, count=self.numel)
    return self._array


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``) on a numpy storage."""
  del unused  # requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage.")
  flat = storage.array()
  size, stride = tuple(size), tuple(stride)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if all(n > 0 for n in size) and (storage_offset < 0 or last >= flat.size):
    raise ValueError(f"storage {storage.key}: view {size}/{stride}+{storage_offset} overruns "
                     f"its {flat.size} elements.")
  view = np.lib.stride_tricks.as_strided(
      flat[storage_offset:], shape=size,
      strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  x = np.array(view, dtype=flat.dtype.newbyteorder("="))
  return bfloat16_to_float32(x) if storage.kind == "BFloat16Storage" else x


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


def _identity(x, *unused):
  del unused
  return x


class _ScriptObject:
  """An inert stand-in for a TorchScript object (``__torch__.*``): just its attributes."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(
          f"TorchScript object {type(self).__qualname__} has a custom __getstate__ state "
          f"({type(state).__name__}); only plain attribute objects are supported.")
    self.__dict__["attributes"] = state


class _Marker:
  """A class that is only referenced (``torch.Tensor`` in ``_rebuild_from_type_v2``)."""


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker,
    ("torch.nn.parameter", "Parameter"): _Marker,
    ("torch", "device"): str,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Archive:
  """A torch zip archive: entries are looked up under its single top-level folder."""

  def __init__(self, path: str):
    self.path = path
    self.zip = zipfile.ZipFile(path)
    names = self.zip.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: a zip file but not a torch checkpoint (no single data.pkl).")
    self.prefix = pkls[0][:-len("data.pkl")]
    self.torchscript = any(n.startswith(self.prefix + "code/") for n in names)
    self.storages: Dict[str, _Storage] = {}

  def read(self, name: str) -> bytes:
    return self.zip.read(self.prefix + name)


class _Unpickler(pickle.Unpickler):
  """Resolves only :data:`_ALLOWED` globals, ``torch.*Storage`` and ``__torch__.*`` classes."""

  def __init__(self, file, archive: _Archive):
    super().__init__(file)
    self.archive = archive
    self.script_types: Dict[str, type] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGES:
      return name
    if module == "__torch__" or module.startswith("__torch__."):
      qualname = f"{module}.{name}"
      if qualname not in self.script_types:
        self.script_types[qualname] = type(name, (_ScriptObject,), {"__qualname__": qualname})
      return self.script_types[qualname]
    raise pickle.UnpicklingError(
        f"{self.archive.path}: data.pkl references the global {module}.{name}, which is not "
        "allowed in a tensor checkpoint (refusing to unpickle it).")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.100}.")
    _, kind, key, _, numel = pid
    if kind not in _STORAGES:
      raise pickle.UnpicklingError(f"unsupported storage type {kind!r}.")
    if key not in self.archive.storages:
      self.archive.storages[key] = _Storage(self.archive, kind, str(key), int(numel))
    return self.archive.storages[key]


def _script_tensors(obj, prefix: str, out: Dict[str, np.ndarray], seen: set):
  """The tensors under a TorchScript module tree, named by attribute path."""
  if id(obj) in seen:
    return
  seen.add(id(obj))
  for name, value in obj.__dict__.get("attributes", {}).items():
    if isinstance(value, np.ndarray):
      out[prefix + name] = value
    elif isinstance(value, _ScriptObject):
      _script_tensors(value, f"{prefix}{name}.", out, seen)


def _tensor_dict(obj: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  for key in _NESTED_KEYS:
    inner = obj.get(key)
    if isinstance(inner, Mapping) and any(isinstance(v, np.ndarray) for v in inner.values()):
      return _tensor_dict(inner)
  return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_torch_zip(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a ``torch.save`` zip checkpoint or a TorchScript archive."""
  archive = _Archive(path)
  try:
    byteorder = archive.read("byteorder").decode().strip()
  except KeyError:
    byteorder = "little"
  if byteorder != "little":
    raise ValueError(f"{path}: byteorder {byteorder!r}; only little-endian files are read.")
  try:
    with archive.zip.open(archive.prefix + "data.pkl") as f:
      obj = _Unpickler(f, archive).load()  # reads every storage it references
  finally:
    archive.zip.close()
  if isinstance(obj, _ScriptObject):
    out: Dict[str, np.ndarray] = {}
    _script_tensors(obj, "", out, set())
  elif isinstance(obj, Mapping):
    out = _tensor_dict(obj)
  else:
    raise ValueError(f"{path}: data.pkl holds a {type(obj).__name__}, not a dict of tensors "
                     "or a TorchScript module.")
  if not out:
    raise ValueError(f"{path}: no tensors found.")
  return out

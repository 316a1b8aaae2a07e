"""Untrusted files on disk: checkpoints are restored without unpickling anything and refused
when made by another model shape (contrastive_jax.config_check); imported CLIP weights with
hostile pickles, truncated or corrupt bytes, or a wrong shape / dtype for one tensor are
refused, naming the file or the tensor (contrastive_jax.models.clip_import)."""

import json
import os
import pickle
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from contrastive_jax import checkpointing, config_check, train
from contrastive_jax.config_check import ConfigError
from contrastive_jax.models import clip_import
from test_clip_import import HEADS, TINY, _clip_state_dict

# Audit events ``pickle.find_class`` (raised whenever any unpickler resolves a global) are
# recorded while this list is not None. Hooks cannot be removed, so one guarded hook is added.
_FIND_CLASS = None


def _audit(event, args):
  if _FIND_CLASS is not None and event == "pickle.find_class":
    _FIND_CLASS.append(args)


sys.addaudithook(_audit)


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def _state_of(config):
  """``(abstract state with shardings, shardings)`` of ``config`` (shapes only: no compile)."""
  tokenizer, objective, mesh, optimizer = train.build(config)
  length = config.tokenizer.context_length
  size = config.data.image_size
  sample = {"image": np.zeros((1, size, size, 3), np.float32),
            "text": np.zeros((1, length), np.int32), "text_mask": np.ones((1, length), bool)}
  shardings, abstract = train.state_shardings(config, objective, optimizer, sample, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  return abstract, shardings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A workdir as the trainer leaves it: a checkpoint of random values of the tiny CLIP
  state at step 3 (meta with the config's JSON) and config.json."""
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("workdir"))
  abstract, _ = _state_of(config)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda s: jax.device_put((rng.standard_normal(s.shape) * 3).astype(s.dtype), s.sharding),
      abstract)
  state = state.replace(step=jax.device_put(np.int32(3), state.step.sharding))
  mngr = checkpointing.manager(workdir, keep=2, async_save=False)
  checkpointing.save(mngr, state, {"step": 3, "data_position": {"step": 3},
                                   "config": config.to_json_best_effort()})
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return config, workdir, jax.device_get(state), abstract


def _raise(*args, **kwargs):
  raise AssertionError("checkpoint restore must not unpickle")


def test_restore_unpickles_nothing(checkpoint, monkeypatch):
  config, workdir, saved, abstract = checkpoint
  for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                       (np, "load"), (np.lib.format, "read_array")):
    monkeypatch.setattr(module, name, _raise)
  for name in ("cloudpickle", "dill"):
    if name in sys.modules:
      monkeypatch.setattr(sys.modules[name], "loads", _raise)
      monkeypatch.setattr(sys.modules[name], "load", _raise)
  global _FIND_CLASS
  _FIND_CLASS = []
  try:
    assert config_check.check_resume(config, workdir) == 3
    directory = os.path.join(workdir, "checkpoints")
    config_check.check_checkpoint_arrays(directory, 3, abstract)
    restored, meta = checkpointing.restore(checkpointing.manager_at(directory), abstract)
    found = _FIND_CLASS
  finally:
    _FIND_CLASS = None
  assert found == [], found  # no unpickler resolved any global
  assert meta["step"] == 3 and int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  monkeypatch.undo()  # the hook does see a real unpickling of a global:
  _FIND_CLASS = []
  try:
    pickle.loads(pickle.dumps(np.float32))
    assert _FIND_CLASS == [("numpy", "float32")], _FIND_CLASS
  finally:
    _FIND_CLASS = None


def test_resume_check_names_shape_keys_and_allows_the_rest(checkpoint, tmp_path):
  config, workdir, _, _ = checkpoint
  # Compute dtype, remat, initial values and optimisation settings do not change shapes.
  same_shapes = tiny_config(**{"model.dtype": "bfloat16", "model.remat": True,
                               "model.logit_scale_init": 1.0, "optimizer.learning_rate": 1e-4,
                               "total_steps": 500, "batch_size": 32, "data.seed": 3})
  assert config_check.check_resume(same_shapes, workdir) == 3
  # ... as the arrays confirm:
  config_check.check_checkpoint_arrays(os.path.join(workdir, "checkpoints"), 3,
                                       _state_of(same_shapes)[0])
  with pytest.raises(ConfigError) as info:
    config_check.check_resume(tiny_config(**{"model.image.width": 64,
                                             "tokenizer.context_length": 32}), workdir)
  text = str(info.value)
  assert f"{workdir} holds a checkpoint (step 3) of another model shape" in text
  assert "model.image.width: checkpoint 32, config 64" in text
  assert "tokenizer.context_length: checkpoint 48, config 32" in text
  assert "--config.model.image.width=32" in text and "another --workdir" in text
  with pytest.raises(ConfigError, match="objective: checkpoint 'clip', config 'siglip'"):
    config_check.check_resume(tiny_config("siglip_shapes"), workdir)
  with pytest.raises(ConfigError, match="data.image_size: checkpoint 32, config 48"):
    config_check.check_resume(tiny_config(**{"data.image_size": 48}), workdir)
  assert config_check.check_resume(config, str(tmp_path / "fresh")) is None


def test_resume_check_reads_config_json_without_meta_config(checkpoint, tmp_path):
  config, workdir, _, _ = checkpoint
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  meta_file = os.path.join(copy, "checkpoints", "3", "meta", "metadata")
  with open(meta_file) as f:
    meta = json.load(f)
  del meta["config"]
  with open(meta_file, "w") as f:
    json.dump(meta, f)
  with pytest.raises(ConfigError, match="model.image.width: checkpoint 32, config 64"):
    config_check.check_resume(tiny_config(**{"model.image.width": 64}), copy)
  os.remove(os.path.join(copy, "config.json"))  # nothing to compare: the array check remains
  assert config_check.check_resume(tiny_config(**{"model.image.width": 64}), copy) == 3
  with open(meta_file, "w") as f:
    f.write('{"step": 3, "config": ')  # a truncated record
  with pytest.raises(ConfigError, match=r"checkpoints/3 has an unreadable meta record"):
    config_check.check_resume(config, copy)


def test_checkpoint_of_another_shape_or_dtype_names_the_arrays(checkpoint):
  config, workdir, _, abstract = checkpoint
  directory = os.path.join(workdir, "checkpoints")
  wider, _ = _state_of(tiny_config(**{"model.image.width": 64}))
  with pytest.raises(ConfigError) as info:
    config_check.check_checkpoint_arrays(directory, 3, wider)
  text = str(info.value)
  assert "params/image_proj/kernel: checkpoint (32, 32) float32, config (64, 32) float32" in text
  assert "params/image_tower/cls: checkpoint (1, 1, 32) float32, config (1, 1, 64)" in text
  assert "(69 array(s))" in text and "... and 57 more" in text  # parameters, then moments
  assert "restore it with its own config" in text
  # orbax itself refuses the shapes too, without naming the array:
  with pytest.raises(ValueError, match="not compatible with the stored shape"):
    checkpointing.restore(checkpointing.manager_at(directory), wider)
  # A dtype mismatch, which orbax would cast silently, and arrays on one side only.
  recast = abstract.replace(rng=jax.ShapeDtypeStruct((2,), np.int32))
  with pytest.raises(ConfigError, match=r"rng: checkpoint \(2,\) uint32, config \(2,\) int32"):
    config_check.check_checkpoint_arrays(directory, 3, recast)
  extra = abstract.replace(objective_state={"queue": jax.ShapeDtypeStruct((4,), np.float32)})
  with pytest.raises(ConfigError, match="objective_state/queue: not in the checkpoint"):
    config_check.check_checkpoint_arrays(directory, 3, extra)
  with pytest.raises(FileNotFoundError):
    config_check.check_checkpoint_arrays(directory, 4, abstract)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's
@pytest.mark.parametrize("name", ["manifest.ocdbt", "_METADATA"])  # reads left unawaited
def test_truncated_checkpoint_files_fail_to_restore(checkpoint, tmp_path, name):
  """The OCDBT manifest and the array metadata of the state, cut in half (orbax keeps no
  checksums of the array bytes: a flipped byte inside an array's data is not detected)."""
  _, workdir, _, abstract = checkpoint
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  path = os.path.join(copy, "checkpoints", "3", "state", name)
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  directory = os.path.join(copy, "checkpoints")
  with pytest.raises(Exception, match="DATA_LOSS|Unterminated string"):
    checkpointing.restore(checkpointing.manager_at(directory), abstract)
  if name == "_METADATA":
    with pytest.raises(ValueError, match=re.escape(os.path.dirname(path)) + ": unreadable"):
      config_check.check_checkpoint_arrays(directory, 3, abstract)


# ----------------------------------------------------------------------------------------------
# Imported weights, as real files.

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """``(state_dict, params, dir)``: a tiny CLIP state dict, its converted params, and the
  same weights as .safetensors, .npz and (with torch installed) torch.save .pt files."""
  sd = _clip_state_dict(**TINY)
  _, params = clip_import.convert(sd, **HEADS)
  directory = tmp_path_factory.mktemp("weights")
  safetensors = pytest.importorskip("safetensors.numpy")
  safetensors.save_file(sd, str(directory / "w.safetensors"))
  np.savez(directory / "w.npz", **sd)
  try:
    import torch  # optional: only the .pt cases need it
  except ImportError:
    torch = None
  if torch is not None:
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, directory / "w.pt")
  return sd, params, directory


def _load(path):
  return clip_import.load(str(path), activation="quick_gelu", **HEADS)[1]


def _written(path, data: bytes):
  path.write_bytes(data)
  return path


@pytest.mark.parametrize("name", ["w.safetensors", "w.npz", "w.pt"])
def test_truncated_or_corrupt_weight_files_name_the_file(weights, tmp_path, name):
  _, params, directory = weights
  if not (directory / name).exists():
    pytest.skip("torch is not installed")
  raw = (directory / name).read_bytes()
  jax.tree.map(np.testing.assert_array_equal, _load(directory / name), params)
  cases = {"truncated": raw[:len(raw) // 2], "tail cut": raw[:-1], "empty": b""}
  if name != "w.safetensors":  # zip files: a flipped byte inside a tensor breaks its CRC
    middle = bytearray(raw)
    middle[len(raw) // 3] ^= 0xFF
    cases["flipped byte"] = bytes(middle)
  else:  # safetensors has no checksum: a broken header is what is detectable
    cases["bad header"] = raw[:8] + b"[" + raw[9:]
    cases["bad header length"] = b"\xff" * 8 + raw[8:]
  for what, data in cases.items():
    path = _written(tmp_path / f"{what.replace(' ', '_')}_{name}", data)
    with pytest.raises(ValueError) as info:
      _load(path)
    assert str(path) in str(info.value), (what, str(info.value))


def test_torch_file_calling_os_system_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  path = tmp_path / "evil.pt"
  torch.save({"visual.proj": torch.zeros(2, 2), "hook": Payload()}, path)
  with pytest.raises(pickle.UnpicklingError,
                     match=re.escape(str(path)) + r".*global (posix|os)\.system"):
    _load(path)
  assert not marker.exists()


def test_wrong_shape_dtype_or_values_for_one_tensor_are_refused(weights, tmp_path):
  sd, _, _ = weights
  safetensors = pytest.importorskip("safetensors.numpy")
  cases = [
      ("visual.proj", np.zeros((64, 17), np.float32),
       r"'text_projection' has shape \(32, 16\); expected \(32, 17\)"),
      ("visual.ln_pre.bias", np.zeros((65,), np.float32),
       r"'visual\.ln_pre\.bias' has shape \(65,\); expected \(64,\)"),
      ("visual.ln_post.weight", np.ones((64,), np.int32),
       r"'visual\.ln_post\.weight' has dtype int32; expected a float tensor"),
      ("token_embedding.weight", np.where(np.arange(40 * 32).reshape(40, 32) == 7, np.nan,
                                          sd["token_embedding.weight"]).astype(np.float32),
       r"'token_embedding\.weight' has 1 non-finite value"),
      ("logit_scale", np.array(np.inf, np.float32), r"'logit_scale' has 1 non-finite"),
  ]
  for key, value, match in cases:
    path = tmp_path / f"{key}.safetensors"
    safetensors.save_file(dict(sd, **{key: value}), str(path))
    with pytest.raises(ValueError, match=match):
      _load(path)

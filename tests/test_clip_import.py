"""CLIP weight import: torch-named state dicts -> TwoTower, checked against a numpy CLIP forward;
safetensors / torch zip / TorchScript readers (no torch needed) and their safety."""

import collections
import io
import json
import math
import pickle
import sys
import types
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models import TwoTower, ViT, clip_import, torch_state
from contrastive_jax.models.transformer import ACTIVATIONS

_erf = np.vectorize(math.erf)
TINY = dict(width=64, patch=4, grid=2, depth=2, text_width=32, text_depth=2, vocab=40,
            context=7, embed=16, mlp=256, text_mlp=128)
HEADS = dict(image_heads=4, text_heads=2)


# ----------------------------------------------------------------------------------------------
# A random CLIP state dict in torch layout, and a numpy forward of OpenAI's model on it.

def _clip_state_dict(seed=0, *, width, patch, grid, depth, text_width, text_depth, vocab, context,
                     embed, mlp, text_mlp):
  rng = np.random.default_rng(seed)
  n = lambda *shape, std=0.02: (rng.standard_normal(shape) * std).astype(np.float32)
  sd = {"visual.conv1.weight": n(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "visual.class_embedding": n(width, std=width ** -0.5),
        "visual.positional_embedding": n(grid * grid + 1, width, std=0.01)}

  def ln(name, w):
    sd[name + ".weight"], sd[name + ".bias"] = 1 + n(w, std=0.1), n(w)

  def blocks(prefix, w, m, count):
    for i in range(count):
      p = f"{prefix}{i}."
      ln(p + "ln_1", w)
      sd[p + "attn.in_proj_weight"] = n(3 * w, w, std=w ** -0.5)
      sd[p + "attn.in_proj_bias"] = n(3 * w)
      sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = n(w, w, std=w ** -0.5), n(w)
      ln(p + "ln_2", w)
      sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = n(m, w, std=w ** -0.5), n(m)
      sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = n(w, m, std=m ** -0.5), n(w)

  ln("visual.ln_pre", width)
  blocks("visual.transformer.resblocks.", width, mlp, depth)
  ln("visual.ln_post", width)
  sd["visual.proj"] = n(width, embed, std=width ** -0.5)
  sd["token_embedding.weight"] = n(vocab, text_width)  # CLIP's std 0.02: eps matters
  sd["positional_embedding"] = n(context, text_width, std=0.01)
  blocks("transformer.resblocks.", text_width, text_mlp, text_depth)
  ln("ln_final", text_width)
  sd["text_projection"] = n(text_width, embed, std=text_width ** -0.5)
  sd["logit_scale"] = np.array(math.log(1 / 0.07), np.float32)
  return sd


def _ln(x, sd, name, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _blocks(x, sd, prefix, heads, activation, eps, causal):
  i, (b, t, w) = 0, x.shape
  while f"{prefix}{i}.ln_1.weight" in sd:
    p = f"{prefix}{i}."
    qkv = _ln(x, sd, p + "ln_1", eps) @ sd[p + "attn.in_proj_weight"].T
    qkv = qkv + sd[p + "attn.in_proj_bias"]
    q, k, v = (y.reshape(b, t, heads, w // heads).transpose(0, 2, 1, 3)
               for y in np.split(qkv, 3, axis=-1))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(w // heads)
    if causal:
      s = s + np.triu(np.full((t, t), -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, t, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = _ln(x, sd, p + "ln_2", eps) @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h / (1 + np.exp(-1.702 * h)) if activation == "quick_gelu" else (
        0.5 * h * (1 + _erf(h / math.sqrt(2))))
    x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    i += 1
  return x


def reference_image(sd, images_nchw, *, heads, activation, eps=1e-5):
  """OpenAI ``VisionTransformer.forward`` in float64 numpy: ``[B, C, H, W] -> [B, E]``."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  conv = sd["visual.conv1.weight"]
  width, c, p, _ = conv.shape
  b, _, h, w = images_nchw.shape
  patches = images_nchw.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
  x = patches.reshape(b, (h // p) * (w // p), c * p * p) @ conv.reshape(width, -1).T
  cls = np.broadcast_to(sd["visual.class_embedding"], (b, 1, width))
  x = np.concatenate([cls, x], axis=1) + sd["visual.positional_embedding"]
  x = _blocks(_ln(x, sd, "visual.ln_pre", eps), sd, "visual.transformer.resblocks.", heads,
              activation, eps, causal=False)
  return _ln(x[:, 0], sd, "visual.ln_post", eps) @ sd["visual.proj"]


def reference_text(sd, tokens, *, heads, activation, eps=1e-5):
  """OpenAI ``CLIP.encode_text`` in float64 numpy (causal mask, argmax pooling)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:tokens.shape[1]]
  x = _blocks(x, sd, "transformer.resblocks.", heads, activation, eps, causal=True)
  x = _ln(x, sd, "ln_final", eps)
  return x[np.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def _inputs(vocab, context, size, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((3, size, size, 3)).astype(np.float32)
  lengths = np.array([2, 5, context])
  tokens = rng.integers(1, vocab - 2, (3, context)).astype(np.int32)
  tokens[:, 0] = vocab - 2  # SOT
  tokens[np.arange(3), lengths - 1] = vocab - 1  # EOT: the largest id
  mask = np.arange(context)[None] < lengths[:, None]
  return images, np.where(mask, tokens, 0), mask


def _to_torch(config, params):
  """Test-only inverse of ``convert``: our TwoTower params in OpenAI names and layouts."""
  params = jax.tree.map(np.asarray, params)
  sd = {}

  def ln(name, p):
    sd[name + ".weight"], sd[name + ".bias"] = p["scale"], p["bias"]

  def encoder(prefix, final, enc, w):
    i = 0
    while f"block{i}" in enc:
      blk, p = enc[f"block{i}"], f"{prefix}{i}."
      a = blk["attn"]
      sd[p + "attn.in_proj_weight"] = np.concatenate(
          [a[k]["kernel"].reshape(w, w).T for k in ("query", "key", "value")])
      sd[p + "attn.in_proj_bias"] = np.concatenate(
          [a[k]["bias"].reshape(w) for k in ("query", "key", "value")])
      sd[p + "attn.out_proj.weight"] = a["out"]["kernel"].reshape(w, w).T
      sd[p + "attn.out_proj.bias"] = a["out"]["bias"]
      ln(p + "ln_1", blk["ln_attn"])
      ln(p + "ln_2", blk["ln_mlp"])
      for torch_name, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
        sd[p + f"mlp.{torch_name}.weight"] = blk["mlp"][ours]["kernel"].T
        sd[p + f"mlp.{torch_name}.bias"] = blk["mlp"][ours]["bias"]
      i += 1
    ln(final, enc["ln_final"])

  img, txt = params["image_tower"], params["text_tower"]
  width = config["image"]["width"]
  assert not img["patch_embed"]["bias"].any(), "CLIP's conv1 has no bias"
  sd["visual.conv1.weight"] = img["patch_embed"]["kernel"].transpose(3, 2, 0, 1)
  sd["visual.class_embedding"] = img["cls"][0, 0]
  sd["visual.positional_embedding"] = np.concatenate([np.zeros((1, width)), img["pos_embed"][0]])
  ln("visual.ln_pre", img["ln_pre"])
  encoder("visual.transformer.resblocks.", "visual.ln_post", img["encoder"], width)
  sd["visual.proj"] = params["image_proj"]["kernel"]
  sd["token_embedding.weight"] = txt["token_embed"]["embedding"]
  sd["positional_embedding"] = txt["pos_embed"][0]
  encoder("transformer.resblocks.", "ln_final", txt["encoder"], config["text"]["width"])
  sd["text_projection"] = params["text_proj"]["kernel"]
  sd["logit_scale"] = params["logit_scale"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _random_params(model, images, tokens, mask, *, conv_bias=True, seed=0):
  """Random float32 numpy values in the shapes of ``model.init`` (which is slow to run)."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(
      jax.eval_shape(model.init, jax.random.key(0), images, tokens, mask)["params"])

  def value(path, x):
    name = jax.tree_util.keystr(path)
    if "patch_embed" in name and x.ndim == 1 and not conv_bias:
      return np.zeros(x.shape, np.float32)  # CLIP's conv1 has no bias
    fan_in = int(np.prod(x.shape[:-1])) if "kernel" in name else 0
    std = fan_in ** -0.5 if fan_in else 0.05
    return ((name.endswith("['scale']")) + std * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(value, shapes)


def _embeddings(config, params, images, tokens, mask):
  encode_image, encode_text = clip_import.encoders(config, params)
  return encode_image(images), encode_text(tokens, mask)


# ----------------------------------------------------------------------------------------------
# Model options.

def test_activation_options_and_defaults():
  x = jnp.linspace(-4.0, 4.0, 101)
  np.testing.assert_allclose(ACTIVATIONS["quick_gelu"](x), x / (1 + np.exp(-1.702 * x)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ACTIVATIONS["gelu_exact"](x), 0.5 * x * (1 + _erf(x / np.sqrt(2))),
                             rtol=1e-5, atol=1e-6)
  tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(ACTIVATIONS["gelu"](x), tanh, rtol=1e-5, atol=1e-6)  # default
  assert np.abs(ACTIVATIONS["gelu"](x) - ACTIVATIONS["gelu_exact"](x)).max() > 1e-4
  images = jnp.zeros((2, 8, 8, 3))
  base = dict(patch_size=4, width=16, depth=1, num_heads=2)
  init = lambda **kw: nn.meta.unbox(
      jax.eval_shape(ViT(**base, **kw).init, jax.random.key(1), images)["params"])
  assert set(init()) == {"patch_embed", "pos_embed", "cls", "encoder"}  # names unchanged
  assert set(init(ln_pre=True)) == {"patch_embed", "pos_embed", "cls", "encoder", "ln_pre"}
  with pytest.raises(ValueError, match="activation"):
    init(activation="relu6")
  assert init(mlp_dim=24)["encoder"]["block0"]["mlp"]["fc1"]["kernel"].shape == (16, 24)


# ----------------------------------------------------------------------------------------------
# Conversion: the core correctness test against the numpy CLIP forward.

@pytest.mark.parametrize("activation,sizes", [
    ("quick_gelu", {}),
    ("gelu_exact", dict(text_width=56, text_mlp=61)),  # a ratio int(r * w) misses: mlp_dim
])
def test_convert_matches_numpy_clip_forward(activation, sizes):
  dims = dict(TINY, **sizes)
  sd = _clip_state_dict(**dims)
  config, params = clip_import.convert(sd, activation=activation, **HEADS)
  assert config["image_size"] == 8 and config["embed_dim"] == 16
  assert config["image"] == dict(patch_size=4, width=64, depth=2, num_heads=4, pool="cls",
                                 ln_pre=True, activation=activation, layer_norm_epsilon=1e-5,
                                 mlp_ratio=4.0)
  assert config["text"]["vocab_size"] == 40 and config["text"]["context_length"] == 7
  assert config["text"].get("mlp_dim") == (61 if sizes else None)
  np.testing.assert_allclose(params["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
  images, tokens, mask = _inputs(dims["vocab"], dims["context"], 8)
  image_emb, text_emb = _embeddings(config, params, images, tokens, mask)
  kw = dict(activation=activation)
  ref_image = reference_image(sd, images.transpose(0, 3, 1, 2), heads=4, **kw)
  ref_text = reference_text(sd, tokens, heads=2, **kw)
  assert image_emb.shape == (3, 16) and text_emb.shape == (3, 16)
  np.testing.assert_allclose(image_emb, ref_image, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(text_emb, ref_text, rtol=1e-4, atol=1e-4)
  # The comparison is sensitive to what it checks: epsilon, activation, head split.
  wrong = [reference_text(sd, tokens, heads=2, activation=activation, eps=1e-6),
           reference_text(sd, tokens, heads=2, activation=(
               "gelu_exact" if activation == "quick_gelu" else "quick_gelu")),
           reference_text(sd, tokens, heads=1, **kw)]
  assert min(np.abs(w - ref_text).max() for w in wrong) > 1e-3
  assert np.abs(reference_image(sd, images.transpose(0, 3, 1, 2), heads=2, **kw)
                - ref_image).max() > 1e-3


def test_round_trip_from_our_model():
  clip = dict(activation="quick_gelu", layer_norm_epsilon=1e-5)
  image = dict(patch_size=4, width=64, depth=2, num_heads=4, pool="cls", ln_pre=True, **clip)
  text = dict(vocab_size=40, context_length=7, width=32, depth=2, num_heads=2, **clip)
  model = TwoTower(image=image, text=text, embed_dim=16)
  images, tokens, mask = _inputs(40, 7, 8)
  params = _random_params(model, images, tokens, mask, conv_bias=False)
  config = dict(embed_dim=16, image=image, text=text)
  sd = _to_torch(config, params)
  config2, params2 = clip_import.convert(sd, activation="quick_gelu", **HEADS)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), params2)
  assert config2["image"] == dict(image, mlp_ratio=4.0)
  assert config2["text"] == dict(text, mlp_ratio=4.0)
  out = jax.jit(model.apply)({"params": params}, images, tokens, mask)
  image_emb, text_emb = _embeddings(config2, params2, images, tokens, mask)
  np.testing.assert_allclose(image_emb, out["image_emb"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(text_emb, out["text_emb"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(text_emb, reference_text(sd, tokens, heads=2,
                                                      activation="quick_gelu"), atol=1e-4)
  np.testing.assert_allclose(image_emb, reference_image(sd, images.transpose(0, 3, 1, 2), heads=4,
                                                        activation="quick_gelu"), atol=1e-4)


def test_state_dict_wrappers_dtypes_and_buffers():
  sd = _clip_state_dict(**TINY)
  _, params = clip_import.convert(sd, **HEADS)
  wrapped = {"module." + k: v.astype(np.float16) for k, v in sd.items()}
  wrapped["module.logit_scale"] = sd["logit_scale"].reshape(1)
  wrapped["module.transformer.resblocks.0.attn_mask"] = np.triu(np.ones((7, 7)), 1)
  wrapped.update(input_resolution=np.array(8), context_length=np.array(7), vocab_size=np.array(40))
  _, params16 = clip_import.convert({"epoch": 3, "state_dict": wrapped}, **HEADS)
  expected = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3),
               expected, params16)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))


def test_model_config_defaults_heads_from_width():
  sd = _clip_state_dict(**dict(TINY, width=128, mlp=512, text_width=64, text_mlp=256))
  config = clip_import.model_config(sd)
  assert config["image"]["num_heads"] == 2 and config["text"]["num_heads"] == 1
  assert config["image"]["activation"] == "quick_gelu"


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.update({"transformer.resblocks.1.mlp.c_fc.weight": np.zeros((129, 32))}),
     r"'transformer\.resblocks\.1\.mlp\.c_fc\.weight' has shape \(129, 32\); expected \(128, 32\)"),
    (lambda sd: sd.update({"visual.proj": np.zeros((64, 17))}),
     r"'text_projection' has shape \(32, 16\); expected \(32, 17\)"),
    (lambda sd: sd.pop("visual.ln_post.bias"), r"Missing tensor 'visual\.ln_post\.bias'"),
    (lambda sd: sd.update({"visual.transformer.resblocks.0.ls_1.gamma": np.ones(64)}),
     r"unexpected tensor.*ls_1\.gamma \(64,\)"),
    (lambda sd: sd.update({"visual.layer1.0.conv1.weight": np.ones((4, 4, 1, 1))}),
     "ModifiedResNet"),
    (lambda sd: sd.update({"text.token_embedding.weight": np.ones((4, 4))}), "CustomTextCLIP"),
    (lambda sd: sd.update({"context_length": np.array(77)}), "context_length=77 disagrees"),
])
def test_convert_errors_name_the_tensor(edit, match):
  sd = _clip_state_dict(**TINY)
  edit(sd)
  with pytest.raises(ValueError, match=match):
    clip_import.convert(sd, **HEADS)


def test_convert_rejects_bad_heads_and_activation():
  sd = _clip_state_dict(**TINY)
  with pytest.raises(ValueError, match="text width 32 does not split into 0 heads"):
    clip_import.convert(sd, image_heads=4)
  with pytest.raises(ValueError, match="image width 64 does not split into 5 heads"):
    clip_import.convert(sd, image_heads=5, text_heads=2)
  with pytest.raises(ValueError, match="activation"):
    clip_import.convert(sd, activation="gelu_tanh", **HEADS)


def test_encoders_of_our_own_config():
  config = dict(embed_dim=8, dtype="float32", image=dict(patch_size=4, width=16, depth=1,
                                                         num_heads=2, pool="cls"),
                text=dict(width=16, depth=1, num_heads=2))
  with pytest.raises(ValueError, match="vocab_size"):
    clip_import.encoders(config, {})
  model = clip_import.two_tower(config, vocab_size=40, context_length=7)
  images, tokens, mask = _inputs(40, 7, 8)
  params = _random_params(model, images, tokens, mask)
  out = jax.jit(model.apply)({"params": params}, images, tokens, mask)
  encode_image, encode_text = clip_import.encoders(config, params, vocab_size=40,
                                                   context_length=7)
  np.testing.assert_allclose(encode_image(images), out["image_emb"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(encode_text(tokens, mask), out["text_emb"], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    encode_image(images[0])


# ----------------------------------------------------------------------------------------------
# File readers.

def _bf16_bits(x):
  return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _write_safetensors(path, tensors):
  """``{name: (dtype string, array)}`` in the safetensors layout."""
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, (dtype, array) in tensors.items():
    raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = dict(dtype=dtype, shape=list(array.shape),
                        data_offsets=[offset, offset + len(raw)])
    chunks.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(chunks))


def test_safetensors_and_npz_readers(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4)).astype(np.float32)
  _write_safetensors(tmp_path / "w.safetensors", {
      "a": ("F32", x), "b": ("F16", x.astype(np.float16)), "c": ("BF16", _bf16_bits(x)),
      "d": ("I64", np.arange(5, dtype=np.int64)), "e": ("BF16", _bf16_bits(np.float32(2.5)))})
  out = torch_state.load_state_dict(str(tmp_path / "w.safetensors"))
  assert list(out) == ["a", "b", "c", "d", "e"]
  np.testing.assert_array_equal(out["a"], x)
  assert out["b"].dtype == np.float16 and out["c"].dtype == np.float32
  np.testing.assert_array_equal(out["c"], (_bf16_bits(x).astype(np.uint32) << 16).view(np.float32))
  np.testing.assert_allclose(out["c"], x, rtol=1e-2)
  np.testing.assert_array_equal(out["d"], np.arange(5))
  assert out["e"].shape == () and out["e"] == 2.5
  np.savez(tmp_path / "w.npz", a=x, d=np.arange(5))
  out = torch_state.load_state_dict(str(tmp_path / "w.npz"))
  np.testing.assert_array_equal(out["a"], x)
  np.testing.assert_array_equal(out["d"], np.arange(5))


def test_load_safetensors_with_open_clip_config(tmp_path):
  sd = _clip_state_dict(**TINY)
  _write_safetensors(tmp_path / "open_clip_model.safetensors",
                     {k: ("F32", v) for k, v in sd.items()})
  path = str(tmp_path / "open_clip_model.safetensors")
  with pytest.raises(ValueError, match="activation="):
    clip_import.load(path)  # no json: the activation must be given
  config, params = clip_import.load(path, activation="gelu_exact", **HEADS)
  assert config["image"]["activation"] == "gelu_exact"
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(
      embed_dim=16, quick_gelu=True, vision_cfg=dict(width=64, head_width=16, layers=2),
      text_cfg=dict(width=32, heads=2, layers=2))}))
  config2, params2 = clip_import.load(path)
  assert config2["image"]["activation"] == "quick_gelu"
  assert config2["image"]["num_heads"] == 4 and config2["text"]["num_heads"] == 2
  jax.tree.map(np.testing.assert_array_equal, params, params2)


class _FakeStorage:
  def __init__(self, kind, key, array):
    self.kind, self.key, self.array = kind, key, np.ascontiguousarray(array)


class _FakeTensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))


@pytest.fixture()
def fake_torch(monkeypatch):
  """Stand-ins registered under torch's module names, so pickle writes torch's globals."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  for kind in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
    setattr(torch, kind, type(kind, (), {"__module__": "torch"}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  script = types.ModuleType("__torch__.model")
  for mod in (torch, utils, script, types.ModuleType("__torch__")):
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
  monkeypatch.setattr(_FakeTensor, "__reduce_ex__", lambda self, proto: (
      _rebuild_tensor_v2, self.args + (False, collections.OrderedDict())), raising=False)
  return torch, script


def _write_torch_zip(path, fake_torch, obj, extra=()):
  torch = fake_torch[0]
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, _FakeStorage):
        storages[o.key] = o.array
        return ("storage", getattr(torch, o.kind), o.key, "cpu", o.array.size)
      return None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    for key, array in storages.items():
      z.writestr(f"archive/data/{key}", array.tobytes())
    for name, text in extra:
      z.writestr(name, text)


def _tensor(kind, key, array):
  array = np.asarray(array)
  stride = [int(s // array.itemsize) for s in array.strides]
  return _FakeTensor(_FakeStorage(kind, key, array), 0, array.shape, stride)


def test_torch_zip_reader(tmp_path, fake_torch):
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  shared = _FakeStorage("FloatStorage", "0", x)
  state = collections.OrderedDict([
      ("full", _FakeTensor(shared, 0, (3, 4), (4, 1))),
      ("row", _FakeTensor(shared, 4, (4,), (1,))),         # offset view of the same storage
      ("transposed", _FakeTensor(shared, 0, (4, 3), (1, 4))),
      ("half", _tensor("HalfStorage", "1", x.astype(np.float16))),
      ("bf16", _tensor("BFloat16Storage", "2", _bf16_bits(x / 7))),
      ("scalar", _FakeTensor(_FakeStorage("LongStorage", "3", np.array([7])), 0, (), ())),
      ("bf16_scalar", _FakeTensor(_FakeStorage("BFloat16Storage", "4", _bf16_bits([0.5])),
                                  0, (), ())),
  ])
  state._metadata = collections.OrderedDict([("", {"version": 1})])
  _write_torch_zip(tmp_path / "sd.pt", fake_torch, state)
  out = torch_state.load_state_dict(str(tmp_path / "sd.pt"))
  assert list(out) == list(state)
  np.testing.assert_array_equal(out["full"], x)
  np.testing.assert_array_equal(out["row"], x[1])
  np.testing.assert_array_equal(out["transposed"], x.T)
  assert out["half"].dtype == np.float16 and out["bf16"].dtype == np.float32
  np.testing.assert_allclose(out["bf16"], x / 7, rtol=1e-2)
  assert out["scalar"].shape == () and out["scalar"] == 7
  assert out["bf16_scalar"].shape == () and out["bf16_scalar"] == 0.5
  # An open_clip training checkpoint: the tensors are under "state_dict".
  _write_torch_zip(tmp_path / "ckpt.pt", fake_torch, {"epoch": 2, "state_dict": state})
  assert list(torch_state.load_state_dict(str(tmp_path / "ckpt.pt"))) == list(state)


def test_load_torch_zip_and_torchscript_archive(tmp_path, fake_torch):
  sd = _clip_state_dict(**TINY)
  tensors = {k: _tensor("FloatStorage", str(i), v) for i, (k, v) in enumerate(sd.items())}
  _write_torch_zip(tmp_path / "plain.pt", fake_torch, tensors)
  config, params = clip_import.convert(sd, **HEADS)
  _, loaded = clip_import.load(str(tmp_path / "plain.pt"), activation="quick_gelu", **HEADS)
  jax.tree.map(np.testing.assert_array_equal, params, loaded)
  # TorchScript: the module tree as __torch__ objects (NEWOBJ + BUILD of an attribute dict).
  script = fake_torch[1]
  script.Module = type("Module", (), {"__module__": "__torch__.model"})
  root = script.Module()
  root.training, root.context_length = False, 7
  for name, tensor in tensors.items():
    node = root
    for part in name.split(".")[:-1]:
      if not hasattr(node, part):
        setattr(node, part, script.Module())
      node = getattr(node, part)
    setattr(node, name.split(".")[-1], tensor)
  root.transformer.resblocks.__dict__["0"].attn_mask = _tensor(
      "FloatStorage", "mask", np.triu(np.full((7, 7), -np.inf, np.float32), 1))
  _write_torch_zip(tmp_path / "ViT-T.pt", fake_torch, root,
                   extra=[("archive/code/__torch__/model.py", "..."),
                          ("archive/constants.pkl", "")])
  read = torch_state.load_state_dict(str(tmp_path / "ViT-T.pt"))
  assert set(read) == set(sd) | {"transformer.resblocks.0.attn_mask"}
  _, scripted = clip_import.load(str(tmp_path / "ViT-T.pt"), **HEADS)  # QuickGELU: OpenAI
  jax.tree.map(np.testing.assert_array_equal, params, scripted)
  assert not torch_state.is_torchscript(str(tmp_path / "plain.pt"))
  assert config["image"]["activation"] == "quick_gelu"


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("torch", "load")])
def test_refuses_other_globals(tmp_path, module, name):
  marker = tmp_path / "pwned"
  arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
  cmd = arg.encode()
  payload = (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X"
             + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")
  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
    z.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match=rf"global {module}\.{name}"):
    torch_state.load_state_dict(str(tmp_path / "evil.pt"))
  assert not marker.exists()


def test_refuses_legacy_and_unknown_files(tmp_path):
  (tmp_path / "old.pt").write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
  with pytest.raises(ValueError, match="legacy"):
    torch_state.load_state_dict(str(tmp_path / "old.pt"))
  (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="neither"):
    torch_state.load_state_dict(str(tmp_path / "junk.bin"))


# ----------------------------------------------------------------------------------------------
# Optional: against open_clip itself (skipped unless torch and open_clip are installed).

@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_tiny_model(tmp_path, quick_gelu):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(0)
  model = open_clip.model.CLIP(
      embed_dim=16, quick_gelu=quick_gelu,
      vision_cfg=dict(image_size=8, patch_size=4, width=64, layers=2, head_width=16),
      text_cfg=dict(context_length=7, vocab_size=40, width=32, heads=2, layers=2)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  images, tokens, mask = _inputs(40, 7, 8)
  with torch.no_grad():
    ref_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ref_text = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  activation = "quick_gelu" if quick_gelu else "gelu_exact"
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config, params = clip_import.convert(state, activation=activation, **HEADS)
  image_emb, text_emb = _embeddings(config, params, images, tokens, mask)
  np.testing.assert_allclose(image_emb, ref_image, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(text_emb, ref_text, rtol=1e-4, atol=1e-4)
  # The same weights through torch.save (bfloat16 too) and a TorchScript archive.
  torch.save(model.state_dict(), tmp_path / "sd.pt")
  torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "bf16.pt")
  traced = torch.jit.trace(model, (torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                   torch.from_numpy(tokens).long()), check_trace=False)
  torch.jit.save(traced, str(tmp_path / "traced.pt"))
  for name in ("sd.pt", "traced.pt"):
    read = torch_state.load_state_dict(str(tmp_path / name))
    for key, value in state.items():
      np.testing.assert_array_equal(read[key], value)
  bf16 = torch_state.load_state_dict(str(tmp_path / "bf16.pt"))
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(bf16[key], value.bfloat16().float().numpy())
  _, scripted = clip_import.load(str(tmp_path / "traced.pt"), activation=activation, **HEADS)
  jax.tree.map(np.testing.assert_array_equal, params, scripted)

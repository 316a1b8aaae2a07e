"""OpenAI / open_clip CLIP ViT weights -> :class:`TwoTower` parameters, and jitted encoders.

``convert(state_dict)`` maps the torch names of a CLIP ViT (OpenAI's ``model.py`` and
open_clip's ``VisionTransformer`` / ``TextTransformer``, which share them) onto our modules:

==========================================  ================================================
CLIP (torch layout)                         ours
==========================================  ================================================
``visual.conv1.weight [W, C, p, p]``        ``image_tower/patch_embed/kernel [p, p, C, W]``
(no bias)                                   ``image_tower/patch_embed/bias`` = 0
``visual.class_embedding [W]`` + ``pos[0]`` ``image_tower/cls [1, 1, W]``
``visual.positional_embedding[1:]``         ``image_tower/pos_embed [1, N, W]``
``visual.ln_pre``                           ``image_tower/ln_pre``
``*.resblocks.i.ln_1`` / ``ln_2``           ``*/encoder/block{i}/ln_attn`` / ``ln_mlp``
``attn.in_proj_weight [3W, W]`` (+ bias)    ``attn/{query,key,value}/kernel [W, H, W/H]``
``attn.out_proj.weight [W, W]`` (+ bias)    ``attn/out/kernel [H, W/H, W]``
``mlp.c_fc`` / ``mlp.c_proj`` (Linear)      ``mlp/fc1`` / ``mlp/fc2`` (Dense, kernel = Wᵀ)
``visual.ln_post`` / ``ln_final``           ``*/encoder/ln_final`` (on all tokens)
``visual.proj [W, E]``                      ``image_proj/kernel``
``token_embedding.weight [V, W]``           ``text_tower/token_embed/embedding``
``positional_embedding [L, W]``             ``text_tower/pos_embed [1, L, W]``
``text_projection [W, E]``                  ``text_proj/kernel``
``logit_scale`` (θ, scale = exp θ)          ``logit_scale``; ``logit_bias`` if present
==========================================  ================================================

Things the weights do not say are arguments: the MLP activation (OpenAI and open_clip
"-quickgelu" models use QuickGELU, other open_clip models exact GELU) and the head counts
(OpenAI: ``width // 64`` in both towers; open_clip: ``width // head_width`` for images and
``text_cfg.heads`` for text). :func:`load` reads them from an ``open_clip_config.json`` next
to the weights when there is one, and knows OpenAI's TorchScript files use QuickGELU.
Text is pooled at the last valid token of the mask, which with our CLIP BPE tokenizer
(``context_length`` = the model's 77) is CLIP's ``argmax(tokens)`` EOT position. Images are
NHWC floats at ``model_config["image_size"]``, normalised with CLIP's mean / std.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models import torch_state
from contrastive_jax.models.transformer import activation_fn
from contrastive_jax.models.two_tower import TwoTower

CLIP_LAYER_NORM_EPSILON = 1e-5  # torch nn.LayerNorm
# Scalars OpenAI's TorchScript files carry next to the weights (checked, not imported), and
# the causal-mask buffers some exports keep (recomputed by our text tower).
_METADATA = ("input_resolution", "context_length", "vocab_size")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Params = Dict[str, Any]


def _normalise(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Unwraps ``{"state_dict": ...}``, strips ``module.``, drops ``attn_mask`` buffers."""
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  out = {}
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if key.split(".")[-1] == "attn_mask":
      continue
    out[key] = np.asarray(value)
  for prefix, what in (("visual.layer1.", "a ModifiedResNet image tower"),
                       ("visual.attnpool.", "a ModifiedResNet image tower"),
                       ("visual.trunk.", "a timm image tower"),
                       ("text.", "an open_clip CustomTextCLIP text tower (SigLIP, CoCa, HF)")):
    if any(k.startswith(prefix) for k in out):
      raise ValueError(f"The state dict holds {what} ({prefix}* tensors), which is not "
                       "supported: only CLIP ViT models (visual.conv1 + visual.transformer, "
                       "token_embedding + transformer) can be imported.")
  return out


class _Reader:
  """Takes tensors by name, checking shapes; every tensor must be taken exactly once."""

  def __init__(self, state_dict: Dict[str, np.ndarray]):
    self.sd, self.used = state_dict, set()

  def shape(self, name: str, ndim: Optional[int] = None) -> Tuple[int, ...]:
    if name not in self.sd:
      raise ValueError(f"Missing tensor {name!r} in the CLIP state dict.")
    if ndim is not None and self.sd[name].ndim != ndim:
      raise ValueError(f"Tensor {name!r} has shape {self.sd[name].shape}; expected {ndim} dims.")
    return self.sd[name].shape

  def take(self, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The tensor ``name`` as float32 ``shape``, validated: the shape the model expects, a
    floating dtype (float16 / bfloat16 / float32 / float64), finite values."""
    found = self.shape(name)
    if name in self.used:
      raise ValueError(f"Tensor {name!r} is used twice.")
    if found != tuple(shape) and not (shape == () and found == (1,)):
      raise ValueError(f"Tensor {name!r} has shape {found}; expected {tuple(shape)}.")
    value = self.sd[name]
    if value.dtype.kind != "f":
      raise ValueError(f"Tensor {name!r} has dtype {value.dtype}; expected a float tensor "
                       "(float16, bfloat16, float32 or float64).")
    out = value.astype(np.float32).reshape(shape)
    if not np.isfinite(out).all():
      raise ValueError(f"Tensor {name!r} has {int(np.size(out) - np.isfinite(out).sum())} "
                       "non-finite value(s) (NaN or Inf, or beyond float32); the weights are "
                       "corrupt.")
    self.used.add(name)
    return out

  def layer_norm(self, name: str, width: int) -> Params:
    return dict(scale=self.take(f"{name}.weight", (width,)),
                bias=self.take(f"{name}.bias", (width,)))

  def linear(self, name: str, out: int, inp: int) -> Params:
    return dict(kernel=self.take(f"{name}.weight", (out, inp)).T.copy(),
                bias=self.take(f"{name}.bias", (out,)))

  def finish(self):
    left = sorted(set(self.sd) - self.used - set(_METADATA))
    if left:
      shown = ", ".join(f"{k} {self.sd[k].shape}" for k in left[:8])
      raise ValueError(f"{len(left)} unexpected tensor(s) in the CLIP state dict: {shown}"
                       f"{' ...' if len(left) > 8 else ''}.")


def _num_blocks(sd: Mapping[str, np.ndarray], prefix: str) -> int:
  found = {int(k[len(prefix):].split(".")[0]) for k in sd
           if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
  if not found:
    raise ValueError(f"No transformer blocks {prefix}<i>.* in the CLIP state dict.")
  return max(found) + 1


def _heads(width: int, heads: Optional[int], tower: str) -> int:
  heads = heads or width // 64
  if heads < 1 or width % heads:
    raise ValueError(f"{tower} width {width} does not split into {heads} heads; pass "
                     f"{tower}_heads=.")
  return heads


def _mlp(mlp_dim: int, width: int) -> Dict[str, Any]:
  ratio = mlp_dim / width
  return dict(mlp_ratio=ratio) if int(ratio * width) == mlp_dim else dict(
      mlp_ratio=ratio, mlp_dim=mlp_dim)


def model_config(state_dict: Mapping[str, Any], *, activation: str = "quick_gelu",
                 image_heads: Optional[int] = None,
                 text_heads: Optional[int] = None) -> Dict[str, Any]:
  """The ``config.model`` dict of a CLIP ViT state dict, sizes inferred from tensor shapes.

  Args:
    state_dict: torch-named tensors (OpenAI or open_clip; see :func:`convert`).
    activation: MLP activation of both towers: ``"quick_gelu"`` (OpenAI, open_clip
      "-quickgelu") or ``"gelu_exact"`` (other open_clip models).
    image_heads, text_heads: attention heads; None: ``width // 64``.

  Returns:
    ``dict(embed_dim, dtype="float32", logit_scale_init, [logit_bias_init,] image_size,
    image=dict(patch_size, width, depth, num_heads, mlp_ratio, pool="cls", ln_pre=True,
    activation, layer_norm_epsilon=1e-5), text=dict(vocab_size, context_length, width, depth,
    num_heads, mlp_ratio, activation, layer_norm_epsilon))``. ``image_size`` (the resolution
    of the position embeddings) is not a :class:`TwoTower` argument; the text tower's
    ``vocab_size`` / ``context_length`` must match the tokenizer (CLIP BPE: 49408 / 77).
  """
  activation_fn(activation)  # validates the name
  sd = _normalise(state_dict)
  r = _Reader(sd)
  width, _, patch, patch_w = r.shape("visual.conv1.weight", 4)
  if patch != patch_w:
    raise ValueError(f"Non-square patches {patch}x{patch_w} are not supported.")
  grid = math.isqrt(max(r.shape("visual.positional_embedding", 2)[0] - 1, 0))
  if grid * grid + 1 != r.shape("visual.positional_embedding")[0]:
    raise ValueError("visual.positional_embedding rows are not 1 + a square patch grid: "
                     f"{r.shape('visual.positional_embedding')}.")
  vocab, text_width = r.shape("token_embedding.weight", 2)
  ln = dict(activation=activation, layer_norm_epsilon=CLIP_LAYER_NORM_EPSILON)
  image = dict(patch_size=patch, width=width,
               depth=_num_blocks(sd, "visual.transformer.resblocks."),
               num_heads=_heads(width, image_heads, "image"), pool="cls", ln_pre=True, **ln,
               **_mlp(r.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0], width))
  text = dict(vocab_size=vocab, context_length=r.shape("positional_embedding", 2)[0],
              width=text_width, depth=_num_blocks(sd, "transformer.resblocks."),
              num_heads=_heads(text_width, text_heads, "text"), **ln,
              **_mlp(r.shape("transformer.resblocks.0.mlp.c_fc.weight")[0], text_width))
  r.shape("logit_scale")  # raises if missing
  config = dict(embed_dim=r.shape("visual.proj", 2)[-1], dtype="float32",
                logit_scale_init=float(np.ravel(sd["logit_scale"])[0]),
                image_size=grid * patch, image=image, text=text)
  if "logit_bias" in sd:
    config["logit_bias_init"] = float(np.ravel(sd["logit_bias"])[0])
  for key, value in (("input_resolution", config["image_size"]),
                     ("context_length", text["context_length"]), ("vocab_size", vocab)):
    if key in sd and int(np.ravel(sd[key])[0]) != value:
      raise ValueError(f"State dict {key}={int(np.ravel(sd[key])[0])} disagrees with the "
                       f"tensor shapes ({value}).")
  return config


def _encoder(r: _Reader, prefix: str, final_ln: str, tower: Mapping[str, Any]) -> Params:
  width, heads = tower["width"], tower["num_heads"]
  mlp, head_dim = tower.get("mlp_dim") or int(tower["mlp_ratio"] * width), width // heads
  out = {}
  for i in range(tower["depth"]):
    p = f"{prefix}{i}."
    qkv_w = r.take(p + "attn.in_proj_weight", (3 * width, width))
    qkv_b = r.take(p + "attn.in_proj_bias", (3 * width,))
    attn = {name: dict(kernel=qkv_w[j * width:(j + 1) * width].T.reshape(width, heads, head_dim),
                       bias=qkv_b[j * width:(j + 1) * width].reshape(heads, head_dim))
            for j, name in enumerate(("query", "key", "value"))}
    out_w = r.take(p + "attn.out_proj.weight", (width, width))
    attn["out"] = dict(kernel=out_w.T.reshape(heads, head_dim, width),
                       bias=r.take(p + "attn.out_proj.bias", (width,)))
    out[f"block{i}"] = dict(
        ln_attn=r.layer_norm(p + "ln_1", width), attn=attn, ln_mlp=r.layer_norm(p + "ln_2", width),
        mlp=dict(fc1=r.linear(p + "mlp.c_fc", mlp, width),
                 fc2=r.linear(p + "mlp.c_proj", width, mlp)))
  out["ln_final"] = r.layer_norm(final_ln, width)
  return out


def convert(state_dict: Mapping[str, Any], *, activation: str = "quick_gelu",
            image_heads: Optional[int] = None,
            text_heads: Optional[int] = None) -> Tuple[Dict[str, Any], Params]:
  """CLIP ViT torch state dict -> ``(model_config, params)`` of :class:`TwoTower`.

  Args:
    state_dict: ``{name: array}`` with OpenAI / open_clip names (a ``module.`` prefix and a
      ``{"state_dict": ...}`` wrapper are accepted); any float dtype.
    activation, image_heads, text_heads: see :func:`model_config`.

  Returns:
    ``model_config`` (see :func:`model_config`) and the float32 numpy ``params`` tree that
    ``two_tower(model_config)`` applies.

  Raises:
    ValueError: a ResNet / timm image tower, a missing or unexpected tensor, or a tensor whose
      shape disagrees with the others (the message names it and both shapes).
  """
  config = model_config(state_dict, activation=activation, image_heads=image_heads,
                        text_heads=text_heads)
  r = _Reader(_normalise(state_dict))
  img, txt, embed = config["image"], config["text"], config["embed_dim"]
  width, patch = img["width"], img["patch_size"]
  conv = r.take("visual.conv1.weight", r.shape("visual.conv1.weight"))
  pos = r.take("visual.positional_embedding", ((config["image_size"] // patch) ** 2 + 1, width))
  cls = r.take("visual.class_embedding", (width,))
  image = dict(
      patch_embed=dict(kernel=conv.transpose(2, 3, 1, 0).copy(),
                       bias=np.zeros((width,), np.float32)),
      pos_embed=pos[None, 1:].copy(), cls=(cls + pos[0])[None, None],
      ln_pre=r.layer_norm("visual.ln_pre", width),
      encoder=_encoder(r, "visual.transformer.resblocks.", "visual.ln_post", img))
  text = dict(
      token_embed=dict(embedding=r.take("token_embedding.weight",
                                        (txt["vocab_size"], txt["width"]))),
      pos_embed=r.take("positional_embedding", (txt["context_length"], txt["width"]))[None],
      encoder=_encoder(r, "transformer.resblocks.", "ln_final", txt))
  params = dict(image_tower=image, text_tower=text,
                image_proj=dict(kernel=r.take("visual.proj", (width, embed))),
                text_proj=dict(kernel=r.take("text_projection", (txt["width"], embed))),
                logit_scale=r.take("logit_scale", ()))
  if "logit_bias_init" in config:
    params["logit_bias"] = r.take("logit_bias", ())
  r.finish()
  _check_against_model(config, params, channels=conv.shape[1])
  return config, params


def _check_against_model(config, params, *, channels: int):
  """The converted tree has exactly the structure and shapes :class:`TwoTower` initialises."""
  model = two_tower(config)
  size, length = config["image_size"], config["text"]["context_length"]
  expected = nn.meta.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, size, size, channels)),
      jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool))["params"])
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
      got) != jax.tree.leaves(expected):
    raise AssertionError("Converted CLIP parameters do not match TwoTower's: internal error.")


def _open_clip_cfg(path: str) -> Optional[Dict[str, Any]]:
  cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
  if not os.path.exists(cfg_path):
    return None
  with open(cfg_path) as f:
    return json.load(f).get("model_cfg")


def read_weights(path: str) -> Dict[str, np.ndarray]:
  """:func:`torch_state.load_state_dict`, with every failure naming ``path``.

  Raises:
    FileNotFoundError: no such file.
    pickle.UnpicklingError: ``data.pkl`` references a global outside the allow-list (or is
      not a tensor pickle).
    ValueError: a truncated or corrupt file (bad zip, CRC mismatch, truncated pickle or
      storage, bad safetensors header) or an unsupported format.
  """
  try:
    return torch_state.load_state_dict(path)
  except pickle.UnpicklingError as e:
    if path in str(e):
      raise
    raise pickle.UnpicklingError(f"{path}: {e}") from e
  except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, struct.error, UnicodeDecodeError) as e:
    if isinstance(e, ValueError) and path in str(e):
      raise
    raise ValueError(f"{path}: not a readable weight file, truncated or corrupt "
                     f"({type(e).__name__}: {e}); download or export it again.") from e


def load(path: str, *, activation: Optional[str] = None, image_heads: Optional[int] = None,
         text_heads: Optional[int] = None) -> Tuple[Dict[str, Any], Params]:
  """Reads a CLIP ViT weight file (see :mod:`torch_state`) and :func:`convert` s it.

  ``activation`` / heads default to an ``open_clip_config.json`` next to the file
  (``model_cfg.quick_gelu``, ``vision_cfg.head_width`` (64), ``text_cfg.heads`` (8)), else
  for OpenAI's TorchScript files to QuickGELU and ``width // 64``. For any other file without
  that json, ``activation`` must be given (the weights cannot tell QuickGELU from GELU).
  """
  state_dict = read_weights(path)
  cfg = _open_clip_cfg(path)
  if cfg is not None:
    if activation is None:
      activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu_exact"
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if image_heads is None and isinstance(vision.get("width"), int):
      image_heads = vision["width"] // vision.get("head_width", 64)
    if text_heads is None:
      text_heads = text.get("heads", 8)
  elif activation is None:
    if not torch_state.is_torchscript(path):
      raise ValueError(
          f"{path}: pass activation='quick_gelu' (OpenAI / open_clip '-quickgelu' weights) or "
          "'gelu_exact' (other open_clip models): the weights do not say which, and there is "
          "no open_clip_config.json next to them.")
    activation = "quick_gelu"
  return convert(state_dict, activation=activation, image_heads=image_heads,
                 text_heads=text_heads)


def two_tower(model_config: Mapping[str, Any], **text_overrides) -> TwoTower:
  """:class:`TwoTower` of a ``config.model`` dict (ours or :func:`model_config`'s).

  ``text_overrides`` (``vocab_size``, ``context_length``) complete or replace the text
  tower's arguments, as the tokenizer does for training configs.
  """
  cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  text = dict(cfg["text"], **text_overrides)
  for key in ("vocab_size", "context_length"):
    if key not in text:
      raise ValueError(f"model_config.text has no {key}: pass {key}= (the tokenizer's).")
  dtype = cfg.get("dtype", "float32")
  if dtype not in _DTYPES:
    raise ValueError(f"model_config.dtype={dtype!r}; expected one of {sorted(_DTYPES)}.")
  kwargs = {k: cfg[k] for k in ("logit_scale_init", "logit_bias_init") if cfg.get(k) is not None}
  return TwoTower(image=dict(cfg["image"]), text=text, embed_dim=cfg["embed_dim"],
                  dtype=_DTYPES[dtype], **kwargs)


def encoders(model_config: Mapping[str, Any], params: Params, **text_overrides
             ) -> Tuple[Callable[[np.ndarray], np.ndarray],
                        Callable[[np.ndarray, np.ndarray], np.ndarray]]:
  """Jitted ``(encode_image, encode_text)`` numpy functions of a two-tower checkpoint.

  ``encode_image(images)``: float ``[B, H, W, C]`` normalised images -> float32 ``[B, E]``;
  ``encode_text(tokens, mask)``: int ``[B, L]`` ids and bool ``[B, L]`` mask -> ``[B, E]``.
  Embeddings are projected but not L2-normalised (like CLIP's ``encode_image``).
  ``text_overrides``: see :func:`two_tower`.
  """
  model = two_tower(model_config, **text_overrides)
  params = jax.tree.map(jnp.asarray, params)

  @jax.jit
  def image_fn(p, images):
    return model.apply({"params": p}, images, method=model.encode_image)[0]

  @jax.jit
  def text_fn(p, tokens, mask):
    return model.apply({"params": p}, tokens, mask, method=model.encode_text)[0]

  def encode_image(images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise ValueError(f"encode_image takes [B, H, W, C] images; got shape {images.shape}.")
    return np.asarray(image_fn(params, images))

  def encode_text(tokens, mask):
    return np.asarray(text_fn(params, np.asarray(tokens, np.int32), np.asarray(mask, bool)))

  return encode_image, encode_text

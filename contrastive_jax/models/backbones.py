"""Image backbones behind one call contract, built from a config dict.

Every backbone is a flax module called as

  ``backbone(x, *, train, axis_name=None) -> (pooled, feature_map)``

with float images ``x [B, H, W, C]``, a float32 ``pooled [B, D]`` and a spatial
``feature_map [B, h, w, D]`` (compute dtype), so objectives written against this contract run
on a ResNet (BatchNorm: ``train`` / ``axis_name`` matter) or a ViT (both ignored) unchanged.

``make_backbone`` reads a plain mapping (a dict or a ``ConfigDict``)::

  dict(kind="resnet", name="resnet18", width=64, stem="cifar",
       zero_init_residual=True, bn_momentum=0.9)
  dict(kind="vit", patch_size=16, width=384, depth=12, num_heads=6, mlp_ratio=4.0,
       pool="cls")
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.resnet import RESNET_STAGES, ResNet
from contrastive_jax.models.vit import ViT

_RESNET_KEYS = ("width", "stem", "zero_init_residual", "bn_momentum")
_VIT_KEYS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "pool")
_VIT_REQUIRED = ("patch_size", "width", "depth", "num_heads")


class ViTBackbone(nn.Module):
  """:class:`ViT` under the backbone contract: patch tokens as a ``[B, H/p, W/p, D]`` map.

  Attributes are those of :class:`ViT`; ``train`` and ``axis_name`` are accepted and ignored
  (the ViT has no batch statistics and no dropout).
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  pool: str = "cls"
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: Optional[Hashable] = None):
    del train, axis_name
    b, h, w, _ = x.shape
    pooled, tokens = ViT(self.patch_size, self.width, self.depth, self.num_heads,
                         mlp_ratio=self.mlp_ratio, pool=self.pool, dtype=self.dtype,
                         name="vit")(x)
    # Patch tokens come from a row-major reshape of the patchify convolution's output.
    fmap = tokens.reshape(b, h // self.patch_size, w // self.patch_size, self.width)
    return pooled.astype(jnp.float32), fmap


def _check_keys(spec: dict, allowed, kind: str):
  unknown = sorted(set(spec) - set(allowed) - {"kind", "dtype"})
  if unknown:
    raise ValueError(f"Unknown backbone config key(s) {unknown} for kind={kind!r}; "
                     f"expected some of {sorted(allowed)}.")


def make_backbone(spec: Mapping[str, Any], *, dtype: Any = None) -> nn.Module:
  """Builds a backbone module from a config mapping (see the module docstring).

  Args:
    spec: ``kind`` (``"resnet"`` or ``"vit"``) and that kind's fields. ``resnet`` needs
      ``name`` (a key of ``RESNET_STAGES``) and takes ``width``, ``stem``,
      ``zero_init_residual``, ``bn_momentum``; ``vit`` needs ``patch_size``, ``width``,
      ``depth``, ``num_heads`` and takes ``mlp_ratio``, ``pool``. Either may set ``dtype``
      (a dtype or its name, e.g. ``"bfloat16"``).
    dtype: compute dtype; overrides ``spec['dtype']``; float32 when neither is given.

  Returns:
    An unbound flax module with the backbone call contract.

  Raises:
    ValueError: naming the offending key for an unknown ``kind``, ``name`` or extra key, or
      a missing required key.
  """
  spec = dict(spec.items())
  kind = spec.get("kind")
  if dtype is None:
    dtype = spec.get("dtype", jnp.float32)
  dtype = jnp.dtype(dtype)
  if kind == "resnet":
    _check_keys(spec, ("name",) + _RESNET_KEYS, kind)
    name = spec.get("name")
    if name not in RESNET_STAGES:
      raise ValueError(f"Backbone config key 'name'={name!r} (kind='resnet'); expected one "
                       f"of {sorted(RESNET_STAGES)}.")
    stage_sizes, block = RESNET_STAGES[name]
    kwargs = {k: spec[k] for k in _RESNET_KEYS if k in spec}
    return ResNet(stage_sizes=stage_sizes, block=block, dtype=dtype, **kwargs)
  if kind == "vit":
    _check_keys(spec, _VIT_KEYS, kind)
    missing = [k for k in _VIT_REQUIRED if k not in spec]
    if missing:
      raise ValueError(f"Backbone config (kind='vit') lacks key(s) {missing}.")
    return ViTBackbone(dtype=dtype, **{k: spec[k] for k in _VIT_KEYS if k in spec})
  raise ValueError(f"Backbone config key 'kind'={kind!r}; expected 'resnet' or 'vit'.")

"""ResNet backbones (He et al., 2016) with (optionally synchronised) BatchNorm.

The layout is torchvision's ("ResNet v1.5": the stride of a bottleneck block sits on its 3×3
convolution), without the classification layer. Every convolution has no bias and is followed
by BatchNorm; ``axis_name`` chooses where the batch statistics come from:

* ``axis_name=None``: the local batch (per-device BN);
* ``axis_name='data'`` inside ``jax.shard_map`` / ``jax.pmap``: the global batch, through a
  ``pmean`` of the per-device moments (SyncBN, as SimCLR, SwAV, MoCo-v2 and PixPro train).

Batch statistics live in the ``batch_stats`` collection: apply with ``train=True`` and
``mutable=['batch_stats']`` to use the batch moments and update the running averages, and with
``train=False`` to use the running averages (nothing is updated).
"""

from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")

# name -> (blocks per stage, block kind); channels of stage s are width·2^s (·4 for bottleneck).
RESNET_STAGES = {
    "resnet10": ((1, 1, 1, 1), "basic"),  # small and quick to compile: tests, tiny configs
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
    "resnet152": ((3, 8, 36, 3), "bottleneck"),
}

# Kaiming-normal with fan-out (torchvision's ResNet init for convolutions; "normal" is
# not truncated).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Norm(nn.Module):
  """BatchNorm + optional ReLU; ``zero_scale`` starts the scale γ at 0 (zero-init residual)."""

  momentum: float
  zero_scale: bool = False
  relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: Optional[Hashable]):
    scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                     axis_name=axis_name, scale_init=scale_init, dtype=self.dtype,
                     name="bn")(x)
    return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
  """Basic (two 3×3) or bottleneck (1×1, 3×3, 1×1 with 4× expansion) residual block.

  ``__call__(x [B, H, W, C], *, train, axis_name)`` returns ``[B, H/s, W/s, filters·e]``
  (``e`` = 1 for basic, 4 for bottleneck; ``s`` = ``strides``). The shortcut is a strided
  1×1 convolution + BN when the shape changes and the identity otherwise.
  """

  filters: int
  strides: int = 1
  bottleneck: bool = False
  zero_init_residual: bool = True
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: Optional[Hashable] = None):
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), strides=(s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=conv_init, dtype=self.dtype, name=name)
    norm = lambda name, **kw: _Norm(self.bn_momentum, dtype=self.dtype, name=name, **kw)
    bn = dict(train=train, axis_name=axis_name)
    if self.bottleneck:
      out = self.filters * 4
      y = norm("norm1")(conv(self.filters, 1, 1, "conv1")(x), **bn)
      y = norm("norm2")(conv(self.filters, 3, self.strides, "conv2")(y), **bn)
      y = conv(out, 1, 1, "conv3")(y)
      y = norm("norm3", zero_scale=self.zero_init_residual, relu=False)(y, **bn)
    else:
      out = self.filters
      y = norm("norm1")(conv(self.filters, 3, self.strides, "conv1")(x), **bn)
      y = conv(self.filters, 3, 1, "conv2")(y)
      y = norm("norm2", zero_scale=self.zero_init_residual, relu=False)(y, **bn)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, "proj_conv")(x)
      x = norm("proj_norm", relu=False)(x, **bn)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet trunk: stem, four (or ``len(stage_sizes)``) stages, global average pool.

  Attributes:
    stage_sizes: residual blocks per stage, e.g. ``(2, 2, 2, 2)`` (see ``RESNET_STAGES``).
    block: ``"basic"`` or ``"bottleneck"``.
    width: channels of the stem and the first stage (64 in the paper); stage ``s`` has
      ``width·2^s`` (times 4 at the output of bottleneck blocks).
    stem: ``"imagenet"`` (7×7/2 conv + 3×3/2 max-pool: 224 px -> 7×7 final map) or
      ``"cifar"`` (3×3/1 conv, no pool: small images such as 28 or 32 px).
    zero_init_residual: start the last BN scale of every residual branch at 0, so each
      block starts as the identity (Goyal et al., 2017).
    bn_momentum: running-average momentum in flax's convention
      (``running = m·running + (1 − m)·batch``; 0.9 = PyTorch's 0.1).
    dtype: compute dtype; parameters and batch statistics stay float32.

  ``__call__(x, *, train, axis_name=None)`` takes float images ``[B, H, W, C]`` and returns
  ``(pooled, feature_map)``: float32 ``[B, C_out]`` (mean over the final map) and the final
  map ``[B, h, w, C_out]`` in ``dtype`` (``h = ⌈H/32⌉`` for the imagenet stem, ``⌈H/8⌉`` for
  the cifar stem with four stages; ``C_out = width·2^(S−1)·e``).
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = True
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Channels of the pooled output and the final feature map."""
    expansion = 4 if self.block == "bottleneck" else 1
    return self.width * 2 ** (len(self.stage_sizes) - 1) * expansion

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: Optional[Hashable] = None):
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet block={self.block!r}; expected one of {BLOCKS}.")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}; expected one of {STEMS}.")
    bn = dict(train=train, axis_name=axis_name)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)],
                  use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                  name="stem_conv")(x)
      x = _Norm(self.bn_momentum, dtype=self.dtype, name="stem_norm")(x, **bn)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    else:
      x = nn.Conv(self.width, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)
      x = _Norm(self.bn_momentum, dtype=self.dtype, name="stem_norm")(x, **bn)
    for s, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        x = ResidualBlock(
            self.width * 2 ** s, strides=2 if (s > 0 and i == 0) else 1,
            bottleneck=self.block == "bottleneck",
            zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
            dtype=self.dtype, name=f"stage{s + 1}_block{i + 1}")(x, **bn)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return pooled, x


def resnet(name: str, **kwargs) -> ResNet:
  """``ResNet`` by name (``"resnet18"`` ... ``"resnet152"``); ``kwargs`` set the other fields."""
  if name not in RESNET_STAGES:
    raise ValueError(f"Unknown ResNet {name!r}; expected one of {sorted(RESNET_STAGES)}.")
  stage_sizes, block = RESNET_STAGES[name]
  return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)

"""Pre-LayerNorm transformer encoder shared by the image and text towers."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


_ROWS_SHARDING: contextvars.ContextVar = contextvars.ContextVar("rows_sharding", default=None)


@contextlib.contextmanager
def rows_sharding(sharding) -> Iterator[None]:
  """Within this context (while tracing), activations ``[B, ...]`` between encoder blocks are
  constrained to ``sharding`` (a ``NamedSharding`` splitting the rows over the batch axes).

  Under FSDP the compiler would otherwise follow the parameters' sharding of the width into
  the activations and reshard them every layer; with the rows pinned it gathers each
  weight where it is used instead.
  """
  token = _ROWS_SHARDING.set(sharding)
  try:
    yield
  finally:
    _ROWS_SHARDING.reset(token)


def constrain_rows(x):
  sharding = _ROWS_SHARDING.get()
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def logical(init, *names):
  """``init`` with flax logical axis names for the parameter's dimensions (``None``: never
  sharded). The names are mapped onto mesh axes by :data:`contrastive_jax.partitioning.RULES`;
  ``embed`` is the model width, the dimension FSDP shards."""
  return nn.with_logical_partitioning(init, names)


def quick_gelu(x):
  """OpenAI CLIP's QuickGELU: ``x · σ(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


# "gelu": flax's default, the tanh approximation (our default); "gelu_exact": the erf form
# (torch ``nn.GELU()``, open_clip); "quick_gelu": OpenAI CLIP and open_clip "-quickgelu" models.
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}


def activation_fn(name: str):
  """The activation called ``name`` (a key of :data:`ACTIVATIONS`)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r}; expected one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Two-layer MLP: ``[..., width] -> [..., mlp_dim] -> [..., width]`` (GELU by default)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = lambda n, axes, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=logical(nn.initializers.xavier_uniform(), *axes),
        bias_init=nn.initializers.normal(1e-6), name=name)
    x = activation_fn(self.activation)(dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x))
    return dense(width, ("mlp", "embed"), "fc2")(x)


class EncoderBlock(nn.Module):
  """``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x, mask: Optional[jax.Array] = None):
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name=name)
    y = ln("ln_attn")(x)
    xavier = nn.initializers.xavier_uniform()
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=logical(xavier, "embed", "heads", "kv"),
        out_kernel_init=logical(xavier, "heads", "kv", "embed"),
        force_fp32_for_softmax=True, name="attn")(y, y, mask=mask)
    x = x + y
    y = ln("ln_mlp")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation,
                        name="mlp")(y)


class Transformer(nn.Module):
  """``depth`` encoder blocks followed by a final LayerNorm; ``[B, N, W] -> [B, N, W]``.

  Attributes:
    depth, num_heads: number of blocks and attention heads.
    mlp_ratio: MLP hidden size as a multiple of the width (ignored when ``mlp_dim`` is set).
    dtype: compute dtype.
    activation: MLP activation, a key of :data:`ACTIVATIONS` (``"gelu"``: tanh approximation).
    layer_norm_epsilon: epsilon of every LayerNorm (flax's 1e-6; torch / CLIP use 1e-5).
    mlp_dim: MLP hidden size; None: ``int(mlp_ratio * width)``.
    remat: recompute each block's activations in the backward pass instead of keeping them
      (``nn.remat``): activation memory of one block instead of ``depth``, for one more
      forward pass of compute. Parameters and numbers are unchanged.
  """

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6
  mlp_dim: Optional[int] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask: Optional[jax.Array] = None):
    mlp_dim = self.mlp_dim or int(self.mlp_ratio * x.shape[-1])
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = constrain_rows(x)
      x = block(self.num_heads, mlp_dim, dtype=self.dtype, activation=self.activation,
                       layer_norm_epsilon=self.layer_norm_epsilon, name=f"block{i}")(x, mask)
    x = constrain_rows(x)
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="ln_final")(x)

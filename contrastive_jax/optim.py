"""Optimizer: AdamW with warm-up + cosine decay, weight-decay mask, clipping, scale projection."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

LOGIT_SCALE_MAX = math.log(100.0)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: kernels and embeddings (ndim ≥ 2).

  Biases, LayerNorm scales, the logit scale / bias and every other 1-D or scalar parameter
  are excluded (open_clip's rule, METHODS.md §0.3).
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _named(params: Any, name: str) -> Any:
  """Mask selecting the leaves whose last path key is ``name``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == name, params)


def project_params(lower: float, upper: float) -> optax.GradientTransformation:
  """Turns updates into ones that land the parameters inside ``[lower, upper]``.

  Placed last in the chain (and masked to chosen leaves), it applies the projection
  ``θ ← clip(θ + u, lower, upper)`` after the optimizer step, as open_clip clamps its logit
  scale after ``optimizer.step()``, instead of clipping inside the forward pass (which
  zeroes the gradient at the bound).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_params needs params in update().")
    updates = jax.tree.map(lambda u, p: jnp.clip(p + u, lower, upper) - p, updates, params)
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up to ``opt_config.learning_rate`` then cosine decay to ``end_factor``× it."""
  warmup = min(opt_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=opt_config.learning_rate * opt_config.get("end_factor", 0.0))


def make_optimizer(opt_config, total_steps: int,
                   logit_scale_max: Optional[float] = LOGIT_SCALE_MAX) -> optax.GradientTransformation:
  """``clip_by_global_norm -> adamw (masked decay) -> logit-scale projection``."""
  parts = []
  if opt_config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(opt_config, total_steps), b1=opt_config.b1, b2=opt_config.b2,
      eps=opt_config.eps, weight_decay=opt_config.weight_decay, mask=decay_mask))
  if logit_scale_max is not None:
    parts.append(optax.masked(project_params(0.0, logit_scale_max),
                              lambda params: _named(params, "logit_scale")))
  return optax.chain(*parts)

"""Optimizer: AdamW / LARS / SGD with warm-up + cosine decay, weight-decay mask, clipping,
logit-scale projection, unit-norm rows (SwAV prototypes) and leaves frozen for the first steps.

``config.optimizer`` fields: ``name`` (``adamw`` default, ``lars``, ``sgd``), ``learning_rate``,
``warmup_steps``, ``end_factor``, ``weight_decay``, ``grad_clip_norm``; AdamW: ``b1``, ``b2``,
``eps``; LARS / SGD: ``momentum`` (0.9), LARS ``trust_coefficient`` (1e-3); ``unit_norm``: names
of leaves (last path key) whose rows are projected to unit L2 norm after every update;
``freeze``: ``{name: steps}``, leaves whose path contains ``name`` get zero gradient and zero
update for the first ``steps`` updates. ``skip_nonfinite`` (False): wrap everything in
``optax.apply_if_finite`` so a step with a non-finite gradient (or loss, see
:func:`train_state.train_step`) changes nothing but its counters, up to
``max_consecutive_nonfinite`` (10) such steps in a row.
"""

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


def unit_norm_rows(axis: int = -1) -> optax.GradientTransformation:
  """Turns updates into ones that land each row (``axis``) of the parameter on the unit sphere.

  Placed last in the chain (masked to chosen leaves) it is SwAV's re-normalisation of the
  prototypes, done right after the update instead of before the next forward pass (the same
  parameters reach every forward pass).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("unit_norm_rows needs params in update().")

    def project(u, p):
      new = p + u
      norm = jnp.linalg.norm(new, axis=axis, keepdims=True)
      return new / jnp.maximum(norm, 1e-12) - p

    return jax.tree.map(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def frozen_for(steps: int) -> optax.GradientTransformation:
  """Zeroes the updates it sees during the first ``steps`` calls (its own counter); placed
  last in the chain, no projection can move a frozen leaf by rounding either."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    keep = state.count >= steps
    updates = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _path_contains(params: Any, name: str) -> Any:
  """Mask selecting the leaves with ``name`` among the keys of their path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == name for k in path), params)


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up to ``opt_config.learning_rate`` then cosine decay to ``end_factor``× it."""
  warmup = min(opt_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=opt_config.learning_rate * opt_config.get("end_factor", 0.0))


OPTIMIZERS = ("adamw", "lars", "sgd")


def _base_optimizer(opt_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = opt_config.get("name", "adamw")
  if name == "adamw":
    return optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=decay_mask)
  if name == "lars":  # SimCLR / SwAV: no decay nor trust ratio on biases and norm scales
    return optax.lars(schedule, weight_decay=opt_config.weight_decay,
                      weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
                      trust_coefficient=opt_config.get("trust_coefficient", 1e-3),
                      momentum=opt_config.get("momentum", 0.9))
  if name == "sgd":  # MoCo: decoupled from nothing, L2 decay added to the gradient
    return optax.chain(optax.masked(optax.add_decayed_weights(opt_config.weight_decay),
                                    decay_mask),
                       optax.sgd(schedule, momentum=opt_config.get("momentum", 0.9)))
  raise ValueError(f"config.optimizer.name={name!r}; expected one of {OPTIMIZERS}.")


def _freeze_labels(params: Any, names) -> Any:
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return next((name for name in names if name in keys), "train")
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    opt_config, total_steps: int,
    logit_scale_max: Optional[float] = LOGIT_SCALE_MAX) -> optax.GradientTransformation:
  """``clip_by_global_norm -> adamw | lars | sgd -> logit-scale projection -> [unit-norm rows]``
  (see the module docstring for the config fields), inside ``optax.apply_if_finite`` when
  ``skip_nonfinite``: a skipped step runs none of the chain (zero update; schedule counts,
  moments and freeze counters unchanged) and increments ``notfinite_count`` (in a row) and
  ``total_notfinite``; after more than ``max_consecutive_nonfinite`` in a row optax applies
  the update again (the trainer stops before that).

  A frozen leaf gets its own copy of the optimizer that is skipped entirely (zero update,
  state untouched: no momentum, Adam moments or weight decay, as the reference sets its
  gradient to None) for the first ``steps`` updates, and then follows the same learning-rate
  schedule as everything else.
  """
  freeze = {name: int(steps) for name, steps in dict(opt_config.get("freeze") or {}).items()
            if steps}
  schedule = learning_rate_schedule(opt_config, total_steps)
  base = _base_optimizer(opt_config, schedule)
  if freeze:
    transforms = {"train": base}
    for name, steps in freeze.items():
      inner = _base_optimizer(opt_config, lambda count, s=steps: schedule(count + s))
      transforms[name] = optax.transforms.conditionally_mask(inner,
                                                             lambda step, s=steps: step >= s)
    base = optax.multi_transform(transforms, lambda p: _freeze_labels(p, tuple(freeze)))
  parts = []
  if opt_config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  parts.append(base)
  if logit_scale_max is not None:
    parts.append(optax.masked(project_params(0.0, logit_scale_max),
                              lambda params: _named(params, "logit_scale")))
  for name in opt_config.get("unit_norm") or ():
    parts.append(optax.masked(unit_norm_rows(), lambda p, n=name: _path_contains(p, n)))
  parts.extend(optax.masked(frozen_for(steps), lambda p, n=name: _path_contains(p, n))
               for name, steps in freeze.items())
  tx = optax.chain(*parts)
  if opt_config.get("skip_nonfinite", False):
    tx = optax.apply_if_finite(tx, int(opt_config.get("max_consecutive_nonfinite", 10)))
  return tx

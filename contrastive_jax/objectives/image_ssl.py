"""Shared pieces of the image-only (self-supervised) objectives.

:class:`SSLModel` is a backbone (``config.model.backbone``: ResNet or ViT, see
:func:`contrastive_jax.models.backbones.make_backbone`) plus a projection head
(``config.model.projector``) and, when configured, a predictor or SwAV's prototypes.
Its ``encode_image`` gives the backbone's pooled features in inference mode, which the kNN
and linear-probe evaluators classify.

BatchNorm statistics (``batch_stats``) are explicit objective state, returned updated by
every step. ``config.model.batch_norm`` chooses where the batch moments come from:
``"global"`` (default: synchronised over the data axis, SimCLR's / SwAV's global BN) or
``"device"`` (each device's own rows, as per-GPU BN); in ``"device"`` mode the running
averages are ``pmean``'d after the step so the replicated state stays identical.

Momentum (EMA) encoders for MoCo / PixPro are explicit state as well
(:func:`ema_update`, :func:`momentum_at`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Hashable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from contrastive_jax.models import MLPHead
from contrastive_jax.models.backbones import make_backbone
from contrastive_jax.objectives.base import (add_geometry_metrics, dtype_from_config,
                                             geometry_enabled)

BATCH_NORMS = ("global", "device")


class SSLModel(nn.Module):
  """Backbone -> projector [-> predictor] [and prototypes ``[K, dim]``].

  ``__call__(images, *, train=True, axis_name=None)`` takes ``[N, H, W, C]`` and returns a
  dict with ``features`` (float32 ``[N, D]`` pooled backbone output), ``feature_map``
  (``[N, h, w, D]``), ``proj`` (projector output, float32 ``[N, dim]``; with
  ``dense_projector`` the projector runs on every position: ``[N, h, w, dim]``), ``pred``
  (predictor output, when there is one) and ``prototypes`` (float32 ``[K, dim]``, when
  ``num_prototypes > 0``; initialised on the unit sphere).
  """

  backbone: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None
  num_prototypes: int = 0
  dense_projector: bool = False

  def encode_image(self, image):
    features, fmap = self.backbone(image, train=False)
    return features, fmap

  @nn.compact
  def __call__(self, images, *, train: bool = True, axis_name: Optional[Hashable] = None):
    features, fmap = self.backbone(images, train=train, axis_name=axis_name)
    head_in = fmap if self.dense_projector else features
    out = {"features": features, "feature_map": fmap,
           "proj": self.projector(head_in, train=train, axis_name=axis_name)}
    if self.predictor is not None:
      out["pred"] = self.predictor(out["proj"], train=train, axis_name=axis_name)
    if self.num_prototypes:
      dim = out["proj"].shape[-1]

      def unit_rows(rng, shape):
        c = jax.random.normal(rng, shape)
        return c / jnp.linalg.norm(c, axis=-1, keepdims=True)

      out["prototypes"] = self.param("prototypes", unit_rows, (self.num_prototypes, dim))
    return out


def head_from_config(head_config, dtype) -> MLPHead:
  """``config.model.projector`` / ``predictor``: ``hidden``, ``dim``, ``layers``, ``norm``
  (default ``"batch"``), ``last_norm``."""
  return MLPHead(head_config.hidden, head_config.dim, head_config.get("layers", 2),
                 norm=head_config.get("norm", "batch"),
                 last_norm=head_config.get("last_norm", False), dtype=dtype)


def ssl_model_from_config(config, *, num_prototypes: int = 0,
                          dense_projector: bool = False) -> SSLModel:
  model = config.model
  dtype = dtype_from_config(model.get("dtype", "float32"))
  predictor = model.get("predictor")
  return SSLModel(backbone=make_backbone(model.backbone, dtype=dtype),
                  projector=head_from_config(model.projector, dtype),
                  predictor=head_from_config(predictor, dtype) if predictor else None,
                  num_prototypes=num_prototypes, dense_projector=dense_projector)


def flatten_views(views: jax.Array) -> jax.Array:
  """``[B, V, H, W, C]`` -> ``[B·V, H, W, C]`` (row ``b·V + v``)."""
  return views.reshape((-1,) + views.shape[2:])


def unflatten(x: jax.Array, num_views: int) -> jax.Array:
  """``[B·V, ...]`` -> ``[B, V, ...]``, inverse of :func:`flatten_views`."""
  return x.reshape((-1, num_views) + x.shape[1:])


class ImageObjective:
  """Base of the image-only objectives: an :class:`SSLModel` with its BatchNorm state.

  Subclasses set ``batch_keys`` and write ``loss``; ``self.forward`` runs the model in
  training mode and threads the running statistics.

  With ``config.metrics.geometry`` every subclass's ``loss`` also logs ``uniformity`` and
  ``alignment`` of the two views' projections (:meth:`geometry_metrics`; one extra
  gradient-free training-mode forward of the two views).
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    loss = cls.__dict__.get("loss")
    if loss is None:
      return

    @functools.wraps(loss)
    def wrapped(self, params, state, batch, rng, *, axis_name=None):
      value, (metrics, new_state) = loss(self, params, state, batch, rng, axis_name=axis_name)
      if self.geometry and type(self).loss is wrapped:  # outermost override only
        metrics = self.geometry_metrics(params, state, batch, metrics, axis_name=axis_name)
      return value, (metrics, new_state)

    cls.loss = wrapped

  batch_keys = ("views",)
  num_prototypes = 0
  dense_projector = False

  def __init__(self, config, tokenizer=None):
    del tokenizer  # image-only
    bn = config.model.get("batch_norm", "global")
    if bn not in BATCH_NORMS:
      raise ValueError(f"config.model.batch_norm={bn!r}; expected one of {BATCH_NORMS}.")
    self.global_bn = bn == "global"
    self.geometry = geometry_enabled(config)
    self.model = ssl_model_from_config(config, num_prototypes=self.num_prototypes,
                                       dense_projector=self.dense_projector)

  def init_variables(self, rng, batch) -> Dict[str, Any]:
    """The model's variables for the first view of ``batch`` (shapes only)."""
    return self.model.init(rng, batch["views"][:, 0], train=False)

  def init(self, rng, batch):
    variables = self.init_variables(rng, batch)
    return variables["params"], {"batch_stats": variables.get("batch_stats", {})}

  def eval_variables(self, params, state):
    return {"params": params, "batch_stats": state["batch_stats"]}

  def forward(self, params, batch_stats, images, *, axis_name=None):
    """Training-mode forward on ``images [N, H, W, C]``; returns ``(out, new_batch_stats)``.

    Batch moments are global when ``config.model.batch_norm="global"`` (``axis_name`` is
    passed to every BatchNorm) and per device otherwise.
    """
    bn_axis = axis_name if self.global_bn else None
    out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, axis_name=bn_axis, mutable=["batch_stats"])
    return out, mutated.get("batch_stats", {})

  def geometry_metrics(self, params, state, batch, metrics, *, axis_name=None):
    """Adds ``uniformity`` of the first view's projections and their ``alignment`` with the
    second view's to ``metrics`` (gradient-free; dense projections are averaged over
    positions)."""
    views = batch["views"]
    if views.shape[1] < 2:
      return metrics
    out, _ = self.forward(jax.lax.stop_gradient(params), state["batch_stats"],
                          flatten_views(views[:, :2]), axis_name=axis_name)
    z = out["proj"]
    z = unflatten(z.mean(axis=tuple(range(1, z.ndim - 1))) if z.ndim > 2 else z, 2)
    return add_geometry_metrics(metrics, z[:, 0], z[:, 1], axis_name=axis_name)

  def sync_state(self, batch_stats, axis_name):
    """Per-device BN leaves device-dependent running averages; average them so the
    replicated state stays identical (a no-op for global BN, whose moments already are)."""
    if self.global_bn or axis_name is None:
      return batch_stats
    return jax.lax.pmean(batch_stats, axis_name)


def ema_update(target, online, momentum):
  """``target ← m·target + (1 − m)·online`` (stop-gradient on ``online``)."""
  online = jax.lax.stop_gradient(online)
  return optax.incremental_update(online, target, 1.0 - momentum)


def momentum_at(step, base: float, total_steps: int, schedule: str = "cosine"):
  """EMA momentum at ``step``: ``"constant"`` (MoCo: ``base``) or ``"cosine"`` (BYOL /
  PixPro: ``1 − (1 − base)(cos(π t/T) + 1)/2``, from ``base`` to 1)."""
  if schedule == "constant":
    return jnp.asarray(base, jnp.float32)
  if schedule != "cosine":
    raise ValueError(f"config.loss.momentum_schedule={schedule!r}; expected 'constant' or "
                     "'cosine'.")
  t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * t) + 1.0) / 2.0

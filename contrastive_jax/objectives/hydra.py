"""Hydra (SimLAP): contrastive learning from arbitrary label pairs through learned gated
subspaces (METHODS.md §2.5), on two image views with class labels.

Every example ``i`` gets a partner label ``y'_i`` (``config.loss.partner_mode``:
``"arbitrary"`` a random permutation of the device's labels, ``"identical"`` or
``"distinct"``) and a gate ``g_i = sigmoid(MLP((E[y_i] + E[y'_i]) / 2))`` over the projection
dimensions (``E``: a learned label embedding, the MLP with BatchNorm / ReLU). The loss
(:func:`contrastive_jax.losses.hydra.hydra_loss`) contrasts view-1 anchors, gated by ``g²``,
with the global view-2 batch: positives are the examples of class ``y'_i``, and the classes
``y_i`` and ``y'_i`` leave the denominator. The logit scale is learned, ``θ₀ = ln 10``.

Batch keys ``views`` (two) and ``label`` (shapes: single-object scenes,
``config.data.min_objects = max_objects = 1``). ``config.model.gate``: ``num_classes``,
``embed_dim``, ``hidden``, ``logit_scale_init``; ``config.loss.partner_mode``.
"""

from __future__ import annotations

import math
from typing import Hashable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.losses import hydra as hydra_losses
from contrastive_jax.models import MLPHead
from contrastive_jax.objectives import image_ssl
from contrastive_jax.objectives.base import dtype_from_config


class GatedModel(nn.Module):
  """An :class:`image_ssl.SSLModel` plus Hydra's label-pair gates and logit scale.

  ``__call__(images, labels=None, partners=None, *, train, axis_name)`` returns the SSL
  model's outputs, with ``gate`` (float32 ``[n, dim]`` in ``(0, 1)``, for ``n`` label pairs)
  and ``logit_scale`` (``exp θ``) when labels are given.
  """

  ssl: image_ssl.SSLModel
  gate: MLPHead
  num_classes: int
  embed_dim: int
  logit_scale_init: float = math.log(10.0)

  def setup(self):
    self.label_embed = nn.Embed(self.num_classes, self.embed_dim)
    self.logit_scale = self.param(
        "logit_scale", lambda _: jnp.asarray(self.logit_scale_init, jnp.float32))

  def encode_image(self, image):
    return self.ssl.encode_image(image)

  def __call__(self, images, labels=None, partners=None, *, train: bool = True,
               axis_name: Optional[Hashable] = None):
    out = dict(self.ssl(images, train=train, axis_name=axis_name))
    if labels is not None:
      pair = (self.label_embed(jnp.maximum(labels, 0))
              + self.label_embed(jnp.maximum(partners, 0))) / 2.0
      out["gate"] = jax.nn.sigmoid(self.gate(pair, train=train, axis_name=axis_name))
      out["logit_scale"] = jnp.exp(self.logit_scale)
    return out


class Hydra(image_ssl.ImageObjective):
  """Hydra's objective (see the module docstring)."""

  batch_keys = ("views", "label")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    num_views = config.data.views.ssl.get("num", 2)
    if num_views != 2:
      raise ValueError(f"Hydra contrasts two views; config.data.views.ssl.num={num_views}.")
    gate = config.model.gate
    dim = config.model.projector.dim
    self.num_classes = gate.num_classes
    self.partner_mode = config.loss.get("partner_mode", "arbitrary")
    if self.partner_mode not in hydra_losses.PARTNER_MODES:
      raise ValueError(f"config.loss.partner_mode={self.partner_mode!r}; expected one of "
                       f"{hydra_losses.PARTNER_MODES}.")
    dtype = dtype_from_config(config.model.get("dtype", "float32"))
    self.model = GatedModel(
        ssl=self.model, gate=MLPHead(gate.hidden, dim, 2, norm="batch", dtype=dtype),
        num_classes=self.num_classes, embed_dim=gate.get("embed_dim", dim),
        logit_scale_init=gate.get("logit_scale_init", math.log(10.0)))

  def init_variables(self, rng, batch):
    labels = jnp.asarray(batch["label"], jnp.int32)
    return self.model.init(rng, batch["views"][:, 0], labels, labels, train=False)

  def loss(self, params, state, batch, rng, *, axis_name=None):
    labels = jnp.asarray(batch["label"], jnp.int32)
    partners = hydra_losses.partner_labels(rng, labels, mode=self.partner_mode,
                                           num_classes=self.num_classes)
    images = image_ssl.flatten_views(batch["views"])
    bn_axis = axis_name if self.global_bn else None
    out, mutated = self.model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, images, labels, partners,
        train=True, axis_name=bn_axis, mutable=["batch_stats"])
    z = image_ssl.unflatten(out["proj"], 2)
    loss, metrics = hydra_losses.hydra_loss(z[:, 0], z[:, 1], out["gate"], labels, partners,
                                            out["logit_scale"], axis_name=axis_name)
    metrics["logit_scale"] = jax.lax.stop_gradient(out["logit_scale"])
    batch_stats = self.sync_state(mutated.get("batch_stats", {}), axis_name)
    return loss, (metrics, dict(state, batch_stats=batch_stats))

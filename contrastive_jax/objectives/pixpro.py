"""PixPro: pixel-to-propagation consistency between two views (METHODS.md §1.10).

Batch keys: ``views [B, 2, S, S, C]`` and ``view_boxes [B, 2, 4]`` (each view's crop box in
the original image; ``config.data.views.ssl.boxes=True``). The backbone keeps its spatial map
and the projector runs on every position (``config.model.projector``, BatchNorm over all
pixels: the 1×1-convolution MLP). The pixel propagation module's value transform ``g`` is the
model's predictor (``config.model.predictor`` with ``layers=1``: a 1×1 convolution);
``y = PPM(x) = Σ_j max(x̂_i·x̂_j, 0)^γ · normalize(g(x))_j``
(:func:`contrastive_jax.losses.pixpro.pixel_propagation`). The momentum encoder (backbone +
projector, an EMA whose momentum follows a cosine from ``momentum`` to 1) gives the targets,
and :func:`contrastive_jax.losses.pixpro.pixpro_loss` matches ``y`` of each view with the
targets of the other at geometrically close positions.

``config.loss``: ``gamma`` γ (2), ``threshold`` T (0.7), ``momentum`` m₀ (0.99),
``momentum_schedule`` (``cosine``). Not implemented: the optional instance branch (weight 0
in the released recipe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common
from contrastive_jax.losses import pixpro as pixpro_losses
from contrastive_jax.objectives import image_ssl


class PixPro(image_ssl.ImageObjective):
  """PixPro objective (see the module docstring)."""

  batch_keys = ("views", "view_boxes")
  dense_projector = True

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    if self.model.predictor is None:
      raise ValueError("PixPro's value transform is config.model.predictor (layers=1).")
    lc = config.loss
    self.gamma = lc.get("gamma", 2.0)
    self.threshold = lc.get("threshold", 0.7)
    self.momentum = lc.get("momentum", 0.99)
    self.momentum_schedule = lc.get("momentum_schedule", "cosine")
    self.total_steps = config.total_steps

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    state.update(step=jnp.zeros((), jnp.int32),
                 momentum={"params": params, "batch_stats": state["batch_stats"]})
    return params, state

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng
    step = state["step"]
    m = image_ssl.momentum_at(step, self.momentum, self.total_steps, self.momentum_schedule)
    momentum = {"params": image_ssl.ema_update(state["momentum"]["params"], params, m)}
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    target, key_stats = self.forward(momentum["params"], state["momentum"]["batch_stats"],
                                     images, axis_name=axis_name)
    value = common.l2_normalize(out["pred"])
    b, h, w, c = value.shape
    y = pixpro_losses.pixel_propagation(out["proj"].reshape(b, h * w, -1),
                                        value.reshape(b, h * w, c), self.gamma)
    y = image_ssl.unflatten(y.reshape(b, h, w, -1), 2)
    k = image_ssl.unflatten(jax.lax.stop_gradient(target["proj"]), 2)
    boxes = batch["view_boxes"]
    loss, metrics = pixpro_losses.pixpro_loss(y[:, 0], y[:, 1], k[:, 0], k[:, 1], boxes[:, 0],
                                              boxes[:, 1], threshold=self.threshold,
                                              axis_name=axis_name)
    momentum["batch_stats"] = self.sync_state(key_stats, axis_name)
    metrics["momentum"] = m
    new_state = dict(state, step=step + 1, momentum=momentum,
                     batch_stats=self.sync_state(batch_stats, axis_name))
    return loss, (metrics, new_state)

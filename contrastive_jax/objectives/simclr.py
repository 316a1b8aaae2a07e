"""SimCLR and DCL / DCLW: two augmented views, one encoder, a contrastive loss over the
global batch (METHODS.md §1.7, §1.8).

The two views (``views [B, 2, H, W, C]`` from ``config.data.views.ssl``) go through the
backbone and projector together, so BatchNorm sees all ``2B`` images (SimCLR's global BN);
the losses are the memory-lean ring forms ``ring_nt_xent_loss`` / ``ring_dcl_loss`` (equal to
the global-view ``nt_xent_loss`` / ``dcl_loss`` in value, gradients and metrics).

``config.loss``: ``temperature`` (τ), optional ``block_size`` (local anchor rows scored at
once; None: all ``2b``); DCL also ``sigma`` (None: DCL, a float: DCLW) and
``stop_gradient_weights``.
"""

from __future__ import annotations

from contrastive_jax.losses import simclr_ring
from contrastive_jax.objectives import image_ssl


class SimClr(image_ssl.ImageObjective):
  """SimCLR's NT-Xent on two views (the paper's mean over the ``2B`` anchors)."""

  batch_keys = ("views",)

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    num_views = config.data.views.ssl.get("num", 2)
    if num_views != 2:
      raise ValueError(f"{type(self).__name__} contrasts two views; "
                       f"config.data.views.ssl.num={num_views}.")
    self.temperature = config.loss.temperature
    self.block_size = config.loss.get("block_size")

  def embed(self, params, state, batch, axis_name):
    """Projections ``[B, 2, dim]`` of both views and the new BatchNorm statistics."""
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    return image_ssl.unflatten(out["proj"], 2), self.sync_state(batch_stats, axis_name)

  def contrast(self, z1, z2, axis_name):
    return simclr_ring.ring_nt_xent_loss(z1, z2, self.temperature, block_size=self.block_size,
                                         axis_name=axis_name)

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # the views come augmented from the pipeline
    z, batch_stats = self.embed(params, state, batch, axis_name)
    loss, metrics = self.contrast(z[:, 0], z[:, 1], axis_name)
    return loss, (metrics, dict(state, batch_stats=batch_stats))


class Dcl(SimClr):
  """Decoupled contrastive loss (``sigma`` set: DCLW's von Mises–Fisher weighting)."""

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    self.sigma = config.loss.get("sigma")
    self.stop_gradient_weights = config.loss.get("stop_gradient_weights", True)

  def contrast(self, z1, z2, axis_name):
    return simclr_ring.ring_dcl_loss(z1, z2, self.temperature, sigma=self.sigma,
                                     stop_gradient_weights=self.stop_gradient_weights,
                                     block_size=self.block_size, axis_name=axis_name)

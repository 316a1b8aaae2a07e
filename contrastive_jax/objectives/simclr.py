"""SimCLR and DCL / DCLW: two augmented views, one encoder, a contrastive loss over the
global batch (METHODS.md §1.7, §1.8).

The two views (``views [B, 2, H, W, C]`` from ``config.data.views.ssl``) go through the
backbone and projector together, so BatchNorm sees all ``2B`` images (SimCLR's global BN);
the losses are the memory-lean ring forms ``ring_nt_xent_loss`` / ``ring_dcl_loss`` (equal to
the global-view ``nt_xent_loss`` / ``dcl_loss`` in value, gradients and metrics).

``config.loss``: ``temperature`` (τ), optional ``block_size`` (local anchor rows scored at
once; None: all ``2b``); DCL also ``sigma`` (None: DCL, a float: DCLW) and
``stop_gradient_weights``.

Options (default off; off, the objective is plain SimCLR / DCL):

* ``config.loss.bss_ratio`` ``r``: Batch Styles Standardization (METHODS.md §2.9,
  :mod:`contrastive_jax.data.batch_styles`) on the step's batch, in the graph: each view's
  rows on a device take the low-frequency amplitude of one random image of those rows (one
  source per view, device and step, drawn from the step's per-device ``rng``).
* AdaInf (§2.23) changes the data, not the loss: ``config.data.inflation``
  (:mod:`contrastive_jax.data.inflation`: real scenes replicated ``dup`` times among
  generated ones) and weaker views. With it the objective logs ``generated_fraction``, the
  share of the batch's rows that are generated (``index >= num_real``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.data import batch_styles
from contrastive_jax.losses import common, simclr_ring
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
    self.bss_ratio = config.loss.get("bss_ratio") or 0.0
    if not 0.0 <= self.bss_ratio <= 1.0:
      raise ValueError(f"config.loss.bss_ratio={self.bss_ratio}; expected 0 <= r <= 1.")
    self.num_real = (config.data.get("inflation") or {}).get("num_real")

  def standardize_styles(self, views, rng):
    """BSS on ``views [b, 2, H, W, C]``: an independent source image per view."""
    return jnp.stack([batch_styles.batch_style_standardize(views[:, v], jax.random.fold_in(rng, v),
                                                           self.bss_ratio) for v in range(2)],
                     axis=1).astype(views.dtype)

  def embed(self, params, state, batch, axis_name):
    """Projections ``[B, 2, dim]`` of both views and the new BatchNorm statistics."""
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    return image_ssl.unflatten(out["proj"], 2), self.sync_state(batch_stats, axis_name)

  def contrast(self, z1, z2, axis_name):
    return simclr_ring.ring_nt_xent_loss(z1, z2, self.temperature, block_size=self.block_size,
                                         axis_name=axis_name)

  def loss(self, params, state, batch, rng, *, axis_name=None):
    if self.bss_ratio:  # otherwise the views come augmented from the pipeline
      batch = dict(batch, views=self.standardize_styles(batch["views"], rng))
    z, batch_stats = self.embed(params, state, batch, axis_name)
    loss, metrics = self.contrast(z[:, 0], z[:, 1], axis_name)
    if self.num_real is not None:
      generated = (batch["index"] >= self.num_real).astype(jnp.float32)
      rows = generated.shape[0] * (1 if axis_name is None else jax.lax.axis_size(axis_name))
      metrics = dict(metrics,
                     generated_fraction=common.global_sum(jnp.sum(generated), axis_name) / rows)
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

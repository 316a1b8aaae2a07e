"""SLIP: CLIP plus SimCLR on the same image tower (Mu et al., 2022), METHODS.md §1.16.

``L = L_CLIP(image, text) + c_ssl · L_NT-Xent(h(v₁), h(v₂))``: the CLIP term is the exact
global-batch loss (ring form of pattern L, not the reference's gather without gradient);
the SimCLR term scores two image-only augmented views (``views``, from
``config.data.views.ssl``) through the shared image tower and SLIP's own MLP head, at a fixed
temperature, as a memory-lean ring (``ring_nt_xent_loss``, row blocks of
``config.loss.block_size`` as the CLIP term; exact global gradients). The CLIP term sees the
pipeline's ``image`` unchanged.
"""

from __future__ import annotations

import flax.linen as nn

from contrastive_jax import losses
from contrastive_jax.models import MLPHead, TwoTower
from contrastive_jax.objectives import base


class SlipModel(nn.Module):
  """A :class:`TwoTower` (params under ``clip``) plus the SimCLR head (``ssl_head``).

  ``encode_image`` / ``encode_text`` are the two-tower's (for the evaluators).
  ``__call__(image, text, text_mask, views)`` returns the two-tower's outputs plus
  ``ssl_emb``: float32 ``[B, V, ssl_dim]``, the head on the image tower's pooled features of
  each of the ``V`` views (``views``: float ``[B, V, H, W, 3]`` at the model's image size).
  """

  clip: TwoTower
  ssl_hidden: int
  ssl_dim: int
  ssl_layers: int = 3

  def setup(self):
    self.ssl_head = MLPHead(self.ssl_hidden, self.ssl_dim, self.ssl_layers, dtype=self.clip.dtype)

  def encode_image(self, image):
    return self.clip.encode_image(image)

  def encode_text(self, text, text_mask):
    return self.clip.encode_text(text, text_mask)

  def __call__(self, image, text, text_mask, views):
    out = self.clip(image, text, text_mask)
    b, v = views.shape[:2]
    pooled, _ = self.clip.image_tower(views.reshape((b * v,) + views.shape[2:]))
    out["ssl_emb"] = self.ssl_head(pooled).reshape(b, v, -1)
    return out


class Slip:
  """SLIP with the settings of ``config``:

  * ``config.data.views.ssl``: the two SimCLR views (``num`` must be 2);
  * ``config.model.ssl_head``: ``hidden``, ``dim``, ``layers`` of the MLP head;
  * ``config.loss``: ``ssl_scale`` (``c_ssl``), ``ssl_temperature`` (τ), ``block_size`` of
    the ring CLIP loss.
  """

  batch_keys = ("image", "text", "text_mask", "views")

  def __init__(self, config, tokenizer):
    num_views = config.data.views.ssl.get("num", 2)
    if num_views != 2:
      raise ValueError(f"SLIP contrasts two views; config.data.views.ssl.num={num_views}.")
    head = config.model.ssl_head
    self.model = SlipModel(clip=base.clip_two_tower(config, tokenizer), ssl_hidden=head.hidden,
                           ssl_dim=head.dim, ssl_layers=head.get("layers", 3))
    self.block_size = config.loss.get("block_size")
    self.ssl_scale = config.loss.ssl_scale
    self.ssl_temperature = config.loss.ssl_temperature

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["image"], batch["text"], batch["text_mask"],
                                batch["views"])
    return variables["params"], {}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # no stochastic layers; the views come augmented from the pipeline
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"],
                           batch["views"])
    clip_loss, metrics = losses.ring_clip_loss(out["image_emb"], out["text_emb"],
                                               out["logit_scale"], block_size=self.block_size,
                                               axis_name=axis_name)
    ssl_loss, ssl_metrics = losses.ring_nt_xent_loss(
        out["ssl_emb"][:, 0], out["ssl_emb"][:, 1], self.ssl_temperature,
        block_size=self.block_size, axis_name=axis_name)
    metrics.update(clip_loss=clip_loss, ssl_loss=ssl_loss, ssl_acc=ssl_metrics["acc"],
                   logit_scale=out["logit_scale"])
    return clip_loss + self.ssl_scale * ssl_loss, (metrics, state)

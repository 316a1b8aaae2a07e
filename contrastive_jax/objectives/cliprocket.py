"""CLIP🚀 ("Improved baselines for vision-language pre-training", Fini et al., 2023; the
reference code's CL2L), METHODS.md §1.16.

A global CLIP term between the pipeline's (weakly augmented) ``image`` and caption, plus
local terms between ``N`` augmented image views (``local_views``) and ``M`` augmented captions
(``text_aug``), each through the shared towers and a separate MLP projector per modality with
its own learnable scale. Every (image view, caption view) pair is a CLIP loss with label
smoothing ε (the global term is unsmoothed); per direction

  ``L_dir = (L_dir,global + n_aug · mean_pairs L_dir,local) / (1 + n_aug)``,  ``n_aug = N``,

and ``L = ½ (L_img + L_txt)``; all CLIP terms are exact global-batch ring losses.
``config.loss.reduction = "sum"`` doubles it (the reference's ``--loss-avg-or-sum sum``).

Local views smaller than the model's image size are resized (bilinear) to it before the
image tower, since the ViT's position embeddings are sized for one patch grid.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax import losses
from contrastive_jax.models import MLPHead, TwoTower
from contrastive_jax.objectives import base

# The reference initialises the local scale at 1 / 0.1.
LOCAL_LOGIT_SCALE_INIT = math.log(10.0)


class LocalHeads(nn.Module):
  """The local projectors and their scale parameter (named ``logit_scale`` so the optimizer
  projects it into ``[0, ln 100]`` like the global one)."""

  embed_dim: int
  hidden: int
  num_layers: int = 3
  logit_scale_init: float = LOCAL_LOGIT_SCALE_INIT
  dtype: Any = jnp.float32

  def setup(self):
    self.image_proj = MLPHead(self.hidden, self.embed_dim, self.num_layers, dtype=self.dtype)
    self.text_proj = MLPHead(self.hidden, self.embed_dim, self.num_layers, dtype=self.dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init),
                                  ())

  def __call__(self, image_feats, text_feats):
    return (self.image_proj(image_feats), self.text_proj(text_feats),
            jnp.exp(self.logit_scale))


class ClipRocketModel(nn.Module):
  """A :class:`TwoTower` (params under ``clip``) plus :class:`LocalHeads` (``local``).

  ``encode_image`` / ``encode_text`` are the two-tower's (for the evaluators).
  ``__call__(image, text, text_mask, local_views=None, text_aug=None, text_aug_mask=None)``
  returns the two-tower's outputs and, with local inputs, ``local_image_emb`` float32
  ``[B, N, E]``, ``local_text_emb`` float32 ``[B, M, E]`` and ``local_logit_scale``.
  ``local_views`` is float ``[B, N, h, w, 3]``, ``text_aug`` int ``[B, M, L]``.
  """

  clip: TwoTower
  hidden: int
  num_layers: int = 3
  local_logit_scale_init: float = LOCAL_LOGIT_SCALE_INIT

  def setup(self):
    self.local = LocalHeads(self.clip.embed_dim, self.hidden, self.num_layers,
                            self.local_logit_scale_init, dtype=self.clip.dtype)

  def encode_image(self, image):
    return self.clip.encode_image(image)

  def encode_text(self, text, text_mask):
    return self.clip.encode_text(text, text_mask)

  def __call__(self, image, text, text_mask, local_views=None, text_aug=None,
               text_aug_mask=None):
    out = self.clip(image, text, text_mask)
    if local_views is None:
      return out
    b, n = local_views.shape[:2]
    m = text_aug.shape[1]
    views = local_views.reshape((b * n,) + local_views.shape[2:])
    if views.shape[1:3] != image.shape[1:3]:
      views = jax.image.resize(views, (b * n,) + image.shape[1:], "bilinear")
    image_feats, _ = self.clip.image_tower(views)
    text_feats, _ = self.clip.text_tower(text_aug.reshape(b * m, -1),
                                         text_aug_mask.reshape(b * m, -1))
    h_image, h_text, scale = self.local(image_feats, text_feats)
    out.update(local_image_emb=h_image.reshape(b, n, -1), local_text_emb=h_text.reshape(b, m, -1),
               local_logit_scale=scale)
    return out


class ClipRocket:
  """CLIP🚀 with the settings of ``config``:

  * ``config.data.views.local`` / ``.text``: the ``N`` image views and ``M`` captions of the
    local terms (``n_aug = N``; no ``local`` group: plain CLIP);
  * ``config.model.local_head``: ``hidden``, ``layers``, ``logit_scale_init`` of the local
    projectors;
  * ``config.loss``: ``label_smoothing`` (local terms only), ``reduction`` (``"mean"`` or
    ``"sum"``), ``block_size`` of the ring CLIP losses.
  """

  def __init__(self, config, tokenizer):
    views = config.data.get("views") or {}
    local, text = views.get("local"), views.get("text")
    self.num_aug = local.get("num", 2) if local else 0
    if self.num_aug and not text:
      raise ValueError("CLIP🚀's local image views need augmented captions: set "
                       "config.data.views.text.")
    head = config.model.local_head
    self.model = ClipRocketModel(
        clip=base.clip_two_tower(config, tokenizer), hidden=head.hidden, num_layers=head.get("layers", 3),
        local_logit_scale_init=head.get("logit_scale_init", LOCAL_LOGIT_SCALE_INIT))
    self.batch_keys = ("image", "text", "text_mask")
    if self.num_aug:
      self.batch_keys += ("local_views", "text_aug", "text_aug_mask")
    self.block_size = config.loss.get("block_size")
    self.label_smoothing = config.loss.get("label_smoothing", 0.1)
    self.reduction = config.loss.get("reduction", "mean")
    if self.reduction not in ("mean", "sum"):
      raise ValueError(f"config.loss.reduction={self.reduction!r}; expected 'mean' or 'sum'.")

  def _inputs(self, batch):
    inputs = [batch["image"], batch["text"], batch["text_mask"]]
    if self.num_aug:
      inputs += [batch["local_views"], batch["text_aug"], batch["text_aug_mask"]]
    return inputs

  def init(self, rng, batch):
    return self.model.init(rng, *self._inputs(batch))["params"], {}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # no stochastic layers; views and captions come augmented from the pipeline
    out = self.model.apply({"params": params}, *self._inputs(batch))
    clip = lambda x, y, s, eps: losses.ring_clip_loss(
        x, y, s, label_smoothing=eps, block_size=self.block_size, axis_name=axis_name)
    loss, metrics = clip(out["image_emb"], out["text_emb"], out["logit_scale"], 0.0)
    metrics.update(global_loss=loss, logit_scale=out["logit_scale"])
    if self.num_aug:
      h_image, h_text = out["local_image_emb"], out["local_text_emb"]
      pairs = [clip(h_image[:, a], h_text[:, t], out["local_logit_scale"], self.label_smoothing)
               for a in range(h_image.shape[1]) for t in range(h_text.shape[1])]
      local_loss = sum(p[0] for p in pairs) / len(pairs)
      loss = (loss + self.num_aug * local_loss) / (1 + self.num_aug)
      metrics.update(local_loss=local_loss,
                     local_i2t_acc=sum(p[1]["i2t_acc"] for p in pairs) / len(pairs),
                     local_logit_scale=out["local_logit_scale"])
    if self.reduction == "sum":
      loss = 2 * loss
    return loss, (metrics, state)

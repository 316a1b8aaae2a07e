"""ProtoCLIP: CLIP plus episodic prototype-level discrimination (METHODS.md §1.4).

The model is CLIP's :class:`~contrastive_jax.models.TwoTower` plus two linear heads
``g_I, g_T`` (to ``d_p``, on the unnormalised embeddings) and a second learnable scale
``s_p = exp(θ_p)`` stored as ``params['proto']['logit_scale']`` so that the optimizer's
logit-scale projection clamps it at ``ln 100`` like CLIP's own.

Episodes run inside the train step, with all their state explicit in ``objective_state``:

* ``bank_image``, ``bank_text`` ``[E, d_p]``: the normalised, stop-gradient projections of
  the last ``E`` training samples (a ring buffer). The trainer keeps ``objective_state``
  replicated (``shard_map`` with ``out_specs=P()``), so every step gathers the new rows of all
  devices (``psum`` of zero-padded rows) and every device holds the same bank.
* ``image_centroids``, ``text_centroids`` ``[K, d_p]`` (``C^I``, ``C^T``) and their back
  translations ``image_from_text`` (``C^{I←T}``), ``text_from_image`` (``C^{T←I}``); with an
  external teacher also ``teacher_bank``, ``teacher_centroids``, ``image_from_teacher``,
  ``text_from_teacher``.
* ``step``: the objective's own counter, and ``kmeans``: the last clustering's statistics.

Every ``episode_steps`` steps (``jax.lax.cond`` on ``step``) the centroids are refreshed by
k-means on the bank: each device clusters its ``1/W`` slice of the replicated bank, and
per-cluster sums are ``psum``'d (:mod:`contrastive_jax.losses.kmeans`), so the clustering cost
is split over devices and the result is replicated. The first episode is CLIP only (InfoNCE
warm-up, as in the paper).

Departures from the reference, by design:

* the paper clusters a fresh episode of samples drawn in advance (eval-mode features) and
  looks a sample's label up by its episode index; here the bank holds the features the
  training steps just produced, and a sample's label ``y`` is the nearest current centroid
  of its own stop-gradient projection (``y^I`` in image space, ``y^T`` in text space; ``y^E``
  for the teacher's features). That needs no dataset indices and works on streaming data;
* one k-means run per episode and modality (faiss used ``nredo = 3``), initialised from
  ``K`` distinct bank rows chosen by a key derived from ``config.seed`` and the step;
* the paper's final "LiT" episode (locked image tower) is not implemented.

The CLIP term is the memory-lean :func:`~contrastive_jax.losses.ring_clip_loss`.

Config (``config.loss``): ``num_clusters`` K, ``proj_dim`` d_p, ``episode_size`` E,
``episode_steps``, ``kmeans_iterations``, ``teacher_temperature`` τ_t, ``clip_weight``,
``proto_weight``, ``external_weight``, ``back_translation`` (PBT on/off),
``proto_scale_init``, ``block_size`` (ring loss), ``teacher`` (``"module:factory"``; empty =
off) and ``teacher_clusters``. The external teacher is a frozen text encoder:
``factory(config, tokenizer)`` returns a jax-traceable ``fn(text, text_mask) -> [b, d_e]``
(any pretrained text tower with its parameters closed over); none ships with the library.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax import losses
from contrastive_jax.losses import common, kmeans as km
from contrastive_jax.losses import protoclip as proto_losses
from contrastive_jax.models import TwoTower
from contrastive_jax.objectives import base

_KMEANS_KEYS = ("inertia", "empty_clusters", "cluster_perplexity")


class ProtoHeads(nn.Module):
  """``g_I``, ``g_T`` (Dense to ``proj_dim``) and the prototype scale ``exp(logit_scale)``."""

  proj_dim: int
  scale_init: float = math.log(1 / 0.07)

  @nn.compact
  def __call__(self, image_emb, text_emb):
    f32 = lambda x: x.astype(jnp.float32)
    proj_image = nn.Dense(self.proj_dim, name="image_proj")(f32(image_emb))
    proj_text = nn.Dense(self.proj_dim, name="text_proj")(f32(text_emb))
    theta = self.param("logit_scale", nn.initializers.constant(self.scale_init), ())
    return proj_image, proj_text, jnp.exp(theta)


class ProtoClipModel(nn.Module):
  """TwoTower (``params['towers']``) + :class:`ProtoHeads` (``params['proto']``).

  ``__call__`` returns the TwoTower outputs plus ``proj_image``, ``proj_text`` ``[B, d_p]``
  (unnormalised) and ``proto_scale``; ``encode_image`` / ``encode_text`` are the towers'.
  """

  towers: TwoTower
  proj_dim: int
  proto_scale_init: float = math.log(1 / 0.07)

  def setup(self):
    self.proto = ProtoHeads(self.proj_dim, self.proto_scale_init)

  def encode_image(self, image):
    return self.towers.encode_image(image)

  def encode_text(self, text, text_mask):
    return self.towers.encode_text(text, text_mask)

  def __call__(self, image, text, text_mask):
    out = dict(self.towers(image, text, text_mask))
    out["proj_image"], out["proj_text"], out["proto_scale"] = self.proto(
        out["image_emb"], out["text_emb"])
    return out


def load_teacher(spec: str, config, tokenizer) -> Optional[Callable]:
  """``"package.module:factory"`` -> ``factory(config, tokenizer)`` (the frozen teacher
  ``fn(text, text_mask) -> [b, d_e]``); None for an empty spec."""
  if not spec:
    return None
  module, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"config.loss.teacher={spec!r}; expected 'package.module:factory'.")
  return getattr(importlib.import_module(module), name)(config, tokenizer)


class ProtoClip:
  """ProtoCLIP objective (see the module docstring); ``teacher_fn`` overrides
  ``config.loss.teacher``."""

  batch_keys = ("image", "text", "text_mask")

  def __init__(self, config, tokenizer, teacher_fn: Optional[Callable] = None):
    lc = config.loss
    towers = base.two_tower_from_config(
        config.model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
        logit_scale_init=config.model.get("logit_scale_init", TwoTower.logit_scale_init))
    self.model = ProtoClipModel(towers, lc.proj_dim,
                                lc.get("proto_scale_init", math.log(1 / 0.07)))
    self.num_clusters = lc.num_clusters
    self.proj_dim = lc.proj_dim
    self.episode_size = lc.episode_size
    self.episode_steps = lc.episode_steps
    self.iterations = lc.get("kmeans_iterations", 20)
    self.teacher_temperature = lc.get("teacher_temperature", 0.01)
    self.clip_weight = lc.get("clip_weight", 1.0)
    self.proto_weight = lc.get("proto_weight", 1.0)
    self.external_weight = lc.get("external_weight", 0.0)
    self.back_translation = lc.get("back_translation", True)
    self.block_size = lc.get("block_size")
    self.seed = config.seed
    self.teacher_fn = teacher_fn or load_teacher(lc.get("teacher", ""), config, tokenizer)
    self.teacher_clusters = lc.get("teacher_clusters") or self.num_clusters
    if self.external_weight and self.teacher_fn is None:
      raise ValueError("config.loss.external_weight > 0 needs config.loss.teacher.")
    if self.teacher_fn is not None and not self.back_translation:
      raise ValueError("The external teacher needs back translation (config.loss."
                       "back_translation=True), as in the reference.")
    batch = config.batch_size
    if self.episode_size % batch or self.episode_steps * batch < self.episode_size:
      raise ValueError(
          f"config.loss.episode_size={self.episode_size} must be a multiple of the batch "
          f"({batch}) and at most episode_steps × batch = {self.episode_steps * batch}, so the "
          "bank is full at the first clustering.")
    if max(self.num_clusters, self.teacher_clusters) > self.episode_size:
      raise ValueError("k-means needs episode_size ≥ num_clusters.")

  # --- state -------------------------------------------------------------------------------

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["image"], batch["text"], batch["text_mask"])
    e, k, d = self.episode_size, self.num_clusters, self.proj_dim
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    state = dict(step=jnp.zeros((), jnp.int32), bank_image=zeros(e, d), bank_text=zeros(e, d),
                 image_centroids=zeros(k, d), text_centroids=zeros(k, d),
                 image_from_text=zeros(k, d), text_from_image=zeros(k, d),
                 kmeans={f"{m}_{n}": zeros() for m in self._modalities() for n in _KMEANS_KEYS})
    if self.teacher_fn is not None:
      d_e = jax.eval_shape(self.teacher_fn, batch["text"], batch["text_mask"]).shape[-1]
      k_e = self.teacher_clusters
      state.update(teacher_bank=zeros(e, d_e), teacher_centroids=zeros(k_e, d_e),
                   image_from_teacher=zeros(k_e, d), text_from_teacher=zeros(k_e, d))
    return variables["params"], state

  def _modalities(self):
    return ("image", "text") + (("teacher",) if self.teacher_fn is not None else ())

  def _refresh(self, state, axis_name):
    """k-means on every bank (each device clusters its slice) and back translation."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), state["step"])
    banks = {"image": state["bank_image"], "text": state["bank_text"]}
    if self.teacher_fn is not None:
      banks["teacher"] = state["teacher_bank"]
    rows = {m: km.local_rows(bank, axis_name) for m, bank in banks.items()}
    centroids, assign, stats = {}, {}, {}
    for i, m in enumerate(banks):
      k = self.teacher_clusters if m == "teacher" else self.num_clusters
      init = km.init_centroids(jax.random.fold_in(key, i), rows[m], k, axis_name=axis_name)
      centroids[m], assign[m], metrics = km.kmeans(rows[m], init, iterations=self.iterations,
                                                   axis_name=axis_name)
      stats.update({f"{m}_{n}": metrics[n] for n in _KMEANS_KEYS})
    pbt = lambda other, m: proto_losses.back_translate(
        rows[other], assign[m], centroids[m].shape[0], axis_name=axis_name)
    new = dict(image_centroids=centroids["image"], text_centroids=centroids["text"],
               image_from_text=pbt("image", "text") if self.back_translation
               else centroids["text"],
               text_from_image=pbt("text", "image") if self.back_translation
               else centroids["image"], kmeans=stats)
    if self.teacher_fn is not None:
      new.update(teacher_centroids=centroids["teacher"],
                 image_from_teacher=pbt("image", "teacher"),
                 text_from_teacher=pbt("text", "teacher"))
    return new

  # --- loss --------------------------------------------------------------------------------

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # k-means keys come from config.seed and the step: the same on every device
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    step = state["step"]
    keys = self._refresh_keys()
    refresh = (step > 0) & (step % self.episode_steps == 0)
    protos = jax.lax.cond(refresh, lambda s: self._refresh(s, axis_name),
                          lambda s: {k: s[k] for k in keys}, state)
    active = (step >= self.episode_steps).astype(jnp.float32)  # first episode: CLIP only

    clip, metrics = losses.ring_clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                          block_size=self.block_size, axis_name=axis_name)
    p_image = jax.lax.stop_gradient(common.l2_normalize(out["proj_image"]))
    p_text = jax.lax.stop_gradient(common.l2_normalize(out["proj_text"]))
    image_assign, _ = km.nearest_centroid(p_image, protos["image_centroids"])
    text_assign, _ = km.nearest_centroid(p_text, protos["text_centroids"])
    proto, proto_metrics = proto_losses.prototype_loss(
        out["proj_image"], out["proj_text"], out["proto_scale"],
        image_centroids=protos["image_centroids"], text_centroids=protos["text_centroids"],
        image_assign=image_assign, text_assign=text_assign,
        image_centroids_from_text=protos["image_from_text"],
        text_centroids_from_image=protos["text_from_image"],
        teacher_temperature=self.teacher_temperature, axis_name=axis_name)
    total = self.clip_weight * clip + active * self.proto_weight * proto
    metrics.update(proto_metrics, clip_loss=clip, proto_loss=proto, proto_active=active,
                   logit_scale=out["logit_scale"], proto_scale=out["proto_scale"],
                   **{f"kmeans_{k}": v for k, v in protos["kmeans"].items()})

    new_rows = {"bank_image": p_image, "bank_text": p_text}
    if self.teacher_fn is not None:
      teacher = jax.lax.stop_gradient(
          common.l2_normalize(self.teacher_fn(batch["text"], batch["text_mask"])))
      teacher_assign, _ = km.nearest_centroid(teacher, protos["teacher_centroids"])
      ext, ext_metrics = proto_losses.external_teacher_loss(
          out["proj_image"], out["proj_text"], out["proto_scale"], teacher_assign=teacher_assign,
          image_centroids_from_teacher=protos["image_from_teacher"],
          text_centroids_from_teacher=protos["text_from_teacher"], axis_name=axis_name)
      total = total + active * self.external_weight * ext
      metrics.update(ext_metrics, ext_loss=ext)
      new_rows["teacher_bank"] = teacher

    new_state = dict(state, **protos, step=step + 1)
    new_state.update(self._push(state, new_rows, step, axis_name))
    return total, (metrics, new_state)

  def _refresh_keys(self):
    keys = ["image_centroids", "text_centroids", "image_from_text", "text_from_image", "kmeans"]
    if self.teacher_fn is not None:
      keys += ["teacher_centroids", "image_from_teacher", "text_from_teacher"]
    return keys

  def _push(self, state, new_rows, step, axis_name):
    """Writes the global batch's rows (gathered, identical on every device) into the banks."""
    out = {}
    for name, rows in new_rows.items():
      rows = km.gather_rows_invariant(rows, axis_name)
      global_b = rows.shape[0]
      if self.episode_size % global_b:
        raise ValueError(f"episode_size={self.episode_size} is not a multiple of the global "
                         f"batch {global_b}.")
      start = (step % (self.episode_size // global_b)) * global_b
      out[name] = jax.lax.dynamic_update_slice(state[name], rows, (start, 0))
    return out

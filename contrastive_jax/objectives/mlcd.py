"""MLCD: multi-label cluster discrimination on two image views (METHODS.md §1.13).

The model is an :class:`~contrastive_jax.objectives.image_ssl.SSLModel` whose prototypes
``params['prototypes'] [K, dim]`` are the class centres ``W`` of the classifier. Both views of
every image are classified against the ``K`` classes with the multi-label loss of
:func:`contrastive_jax.losses.mlcd.mlcd_loss`; an image's positive set ``Ω⁺`` is its ``l``
nearest cluster centres.

Where the clusters come from (a departure, by design). MLCD clusters LAION once, offline,
with a pretrained CLIP model. Without a pretrained model here, the cluster centres are
k-means centroids of the model's own stop-gradient features, kept in ``objective_state``:

* ``bank [E, dim]``: a FIFO of the normalised mean projection of the two views of the last
  ``E`` images (gathered from every device, identical everywhere);
* ``centroids [K, dim]``: k-means on the bank (each device clusters its ``1/W`` slice,
  sums ``psum``'d), first when the bank is full, then every ``cluster_steps`` steps,
  warm-started from the previous centroids so that class ``k`` keeps its meaning for the
  classifier row ``W_k``;
* ``clustered``: 0 until the first clustering; the loss is 0 (no gradient) before it.

Negatives are sampled PartialFC-style (``negative_ratio`` < 1: every positive of the global
batch plus each other class with that probability; the draw comes from ``config.seed`` and the
step, identical on every device). With ``shard_classes`` the classifier is model-parallel:
each device scores the gathered batch against its ``K/W`` rows of ``W`` (``K % W == 0``).

``config.loss``: ``num_classes`` K, ``num_positive`` l, ``scale`` s, ``margin`` m,
``negative_ratio``, ``shard_classes``, ``bank_size`` E (a multiple of the global batch and
of the device count), ``cluster_steps``, ``kmeans_iterations``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, kmeans as km
from contrastive_jax.losses import mlcd as mlcd_losses
from contrastive_jax.objectives import image_ssl


class Mlcd(image_ssl.ImageObjective):
  """MLCD objective (see the module docstring)."""

  batch_keys = ("views",)

  def __init__(self, config, tokenizer=None):
    lc = config.loss
    self.num_prototypes = lc.num_classes
    super().__init__(config, tokenizer)
    self.num_positive = lc.get("num_positive", 8)
    self.scale = lc.get("scale", 32.0)
    self.margin = lc.get("margin", 0.0)
    self.negative_ratio = lc.get("negative_ratio", 1.0)
    self.shard_classes = lc.get("shard_classes", True)
    self.bank_size = lc.bank_size
    self.cluster_steps = lc.get("cluster_steps", 100)
    self.iterations = lc.get("kmeans_iterations", 10)
    self.seed = config.seed
    if self.num_positive > self.num_prototypes or self.num_prototypes > self.bank_size:
      raise ValueError("MLCD needs num_positive ≤ num_classes ≤ bank_size.")
    if self.bank_size % config.batch_size:
      raise ValueError(f"config.loss.bank_size={self.bank_size} must be a multiple of the "
                       f"batch size {config.batch_size}.")
    num_views = config.data.views.ssl.get("num", 2)
    if num_views != 2:
      raise ValueError(f"MLCD classifies two views; config.data.views.ssl.num={num_views}.")

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    dim = self.model.projector.out
    state.update(step=jnp.zeros((), jnp.int32), clustered=jnp.zeros((), jnp.int32),
                 bank=jnp.zeros((self.bank_size, dim), jnp.float32),
                 centroids=jnp.zeros((self.num_prototypes, dim), jnp.float32))
    return params, state

  def _cluster(self, bank, centroids, clustered, key, axis_name):
    rows = km.local_rows(bank, axis_name)
    fresh = km.init_centroids(key, rows, self.num_prototypes, axis_name=axis_name)
    init = jnp.where(clustered > 0, centroids, fresh)
    return km.kmeans(rows, init, iterations=self.iterations, axis_name=axis_name)[0]

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # clustering and class sampling use config.seed and the step (device-invariant)
    step = state["step"]
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    z = common.l2_normalize(image_ssl.unflatten(out["proj"], 2))  # [b, 2, dim]
    feat = jax.lax.stop_gradient(common.l2_normalize(jnp.mean(z, axis=1)))

    rows = km.gather_rows_invariant(feat, axis_name)
    global_b = rows.shape[0]
    start = (step % (self.bank_size // global_b)) * global_b
    bank = jax.lax.dynamic_update_slice(state["bank"], rows, (start, 0))
    full = (step + 1) * global_b >= self.bank_size
    refresh = full & ((state["clustered"] == 0) | (step % self.cluster_steps == 0))
    centroids = jax.lax.cond(
        refresh, lambda: self._cluster(bank, state["centroids"], state["clustered"],
                                       jax.random.fold_in(key, 0), axis_name),
        lambda: state["centroids"])
    clustered = jnp.maximum(state["clustered"], refresh.astype(jnp.int32))

    labels = mlcd_losses.nearest_centres(feat, centroids, self.num_positive)  # [b, l]
    class_mask = (None if self.negative_ratio >= 1.0 else mlcd_losses.sample_classes(
        jax.random.fold_in(key, 1), labels, self.num_prototypes, self.negative_ratio,
        axis_name=axis_name))
    loss, metrics = mlcd_losses.mlcd_loss(
        z.reshape(-1, z.shape[-1]), out["prototypes"], jnp.repeat(labels, 2, axis=0),
        scale=self.scale, margin=self.margin, class_mask=class_mask,
        shard_classes=self.shard_classes, axis_name=axis_name)
    active = clustered.astype(jnp.float32)
    metrics.update(mlcd_loss=loss, clustered=active)
    new_state = dict(state, batch_stats=self.sync_state(batch_stats, axis_name), step=step + 1,
                     bank=bank, centroids=centroids, clustered=clustered)
    return active * loss, (metrics, new_state)

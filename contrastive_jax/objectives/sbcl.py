"""SBCL: subclass-balancing contrastive learning on two labelled views (METHODS.md §2.36).

Batch keys ``views`` (two augmented views) and ``label`` (class ≥ 0; shapes configs use
single-object scenes so every example is labelled). The loss is
:func:`contrastive_jax.losses.sbcl.sbcl_loss` on the projections of both views.

Subclasses live in ``objective_state``:

* ``bank [E, dim]`` and ``bank_label [E]``: a FIFO of the normalised mean projection of the
  two views and the class of the last ``E`` examples (gathered, identical on every device);
* ``centroids [C, S, dim]`` and ``num_subclasses [C]``: per-class k-means on the bank
  (:func:`~contrastive_jax.losses.sbcl.class_kmeans`), first when the bank is full and then
  every ``cluster_steps`` steps; class ``c`` gets ``clip(n_c // size, 1, S)`` subclasses
  (``size``: ``config.loss.subclass_size``, or the reference's ``max(min_c n_c, 10)`` when
  None). Every device runs the same clustering on the replicated bank.

An example's subclass is the nearest active centroid of its class (its stop-gradient mean
projection). Before the first clustering every class is one subclass and the class term is
off: the loss is SupCon, as in the reference's warm-up epochs.

Departures from the reference: the reference re-clusters the whole training set every
``step`` epochs with a size-balanced k-means, and its SimCLR version sets ``τ₂`` per class
from the class's feature spread; here the clusters come from the bank with plain spherical
k-means and ``class_temperature`` is one value (the MoCo version's 0.12) unless a per-class
list is given. No long-tailed subsampling of the data.

``config.loss``: ``num_classes`` C, ``max_subclasses`` S, ``subclass_size``,
``temperature`` τ₁, ``class_temperature`` τ₂ (float or list of C), ``class_weight`` γ,
``subclass_weight``, ``bank_size`` E (a multiple of the batch), ``cluster_steps``,
``kmeans_iterations``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common, kmeans as km
from contrastive_jax.losses import sbcl as sbcl_losses
from contrastive_jax.objectives.simclr import SimClr


class Sbcl(SimClr):
  """SBCL objective (see the module docstring)."""

  batch_keys = ("views", "label")

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    lc = config.loss
    self.num_classes = lc.num_classes
    self.max_subclasses = lc.get("max_subclasses", 8)
    self.subclass_size = lc.get("subclass_size")
    self.class_temperature = lc.get("class_temperature", 0.12)
    if isinstance(self.class_temperature, (list, tuple)):
      if len(self.class_temperature) != self.num_classes:
        raise ValueError("config.loss.class_temperature lists one value per class.")
      self.class_temperature = tuple(self.class_temperature)
    self.class_weight = lc.get("class_weight", 0.2)
    self.subclass_weight = lc.get("subclass_weight", 1.0)
    self.bank_size = lc.bank_size
    self.cluster_steps = lc.get("cluster_steps", 100)
    self.iterations = lc.get("kmeans_iterations", 10)
    self.seed = config.seed
    if self.bank_size % config.batch_size or self.bank_size < self.max_subclasses:
      raise ValueError(f"config.loss.bank_size={self.bank_size} must be a multiple of the "
                       f"batch size {config.batch_size} and at least max_subclasses.")
    if config.data.source == "shapes" and config.data.get("max_objects", 1) != 1:
      raise ValueError("SBCL needs class labels: set config.data.min_objects = "
                       "config.data.max_objects = 1 (only single-object scenes are labelled).")

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    dim = self.model.projector.out
    c, s = self.num_classes, self.max_subclasses
    state.update(step=jnp.zeros((), jnp.int32), clustered=jnp.zeros((), jnp.int32),
                 bank=jnp.zeros((self.bank_size, dim), jnp.float32),
                 bank_label=jnp.full((self.bank_size,), -1, jnp.int32),
                 centroids=jnp.zeros((c, s, dim), jnp.float32),
                 num_subclasses=jnp.ones((c,), jnp.int32))
    return params, state

  def _cluster(self, bank, bank_label, key):
    counts = sbcl_losses.subclass_counts(bank_label, self.num_classes, self.max_subclasses,
                                         self.subclass_size)
    centroids, _ = sbcl_losses.class_kmeans(key, bank, bank_label, counts, self.max_subclasses,
                                            iterations=self.iterations)
    return centroids, jnp.maximum(counts, 1)

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # clustering keys come from config.seed and the step (device-invariant)
    step = state["step"]
    z, batch_stats = self.embed(params, state, batch, axis_name)  # [b, 2, dim]
    labels = batch["label"].astype(jnp.int32)
    feat = jax.lax.stop_gradient(common.l2_normalize(jnp.mean(common.l2_normalize(z), axis=1)))

    rows = km.gather_rows_invariant(feat, axis_name)
    global_b = rows.shape[0]
    start = (step % (self.bank_size // global_b)) * global_b
    bank = jax.lax.dynamic_update_slice(state["bank"], rows, (start, 0))
    bank_label = jax.lax.dynamic_update_slice(
        state["bank_label"], km.gather_rows_invariant(labels, axis_name), (start,))
    full = (step + 1) * global_b >= self.bank_size
    refresh = full & ((state["clustered"] == 0) | (step % self.cluster_steps == 0))
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    centroids, num_subclasses = jax.lax.cond(
        refresh, lambda: self._cluster(bank, bank_label, key),
        lambda: (state["centroids"], state["num_subclasses"]))
    clustered = jnp.maximum(state["clustered"], refresh.astype(jnp.int32))

    subclasses = sbcl_losses.nearest_subclass(feat, labels, centroids, num_subclasses)
    tau2 = (jnp.asarray(self.class_temperature, jnp.float32)
            if isinstance(self.class_temperature, tuple) else self.class_temperature)
    loss, metrics = sbcl_losses.sbcl_loss(
        z[:, 0], z[:, 1], labels, subclasses, temperature=self.temperature,
        class_temperature=tau2, class_weight=self.class_weight * clustered.astype(jnp.float32),
        subclass_weight=self.subclass_weight, axis_name=axis_name)
    metrics.update(clustered=clustered.astype(jnp.float32),
                   subclasses=jnp.sum(num_subclasses).astype(jnp.float32))
    new_state = dict(state, batch_stats=batch_stats, step=step + 1, clustered=clustered,
                     bank=bank, bank_label=bank_label, centroids=centroids,
                     num_subclasses=num_subclasses)
    return loss, (metrics, new_state)

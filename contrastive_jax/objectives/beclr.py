"""BECLR pretraining: student / EMA teacher with DyCE batch enhancement (METHODS.md §1.14).

The student (``params``) is backbone + projector + predictor; the teacher
(``objective_state['momentum']``) is an EMA copy of the parameters (and its own BatchNorm
statistics) whose momentum follows a cosine from ``momentum`` to 1; only its projections are
used. Both views go through each network as one batch.

Three DyCE memories (``objective_state['memory']``: ``teacher``, ``pred``, ``proj``; see
:mod:`contrastive_jax.losses.beclr`) store the teacher projections, student predictions and
student projections of both views of the global batch. From step ``memory_start`` on (and
once the memories are clustered) every row is followed by its ``topk`` nearest memory rows
within its nearest cluster, each memory searched with its own kind of row, and the loss
:func:`~contrastive_jax.losses.beclr.beclr_loss` runs on the enhanced batch
(``b(1 + topk)`` rows per view). The memories are updated after the loss, with the rows of
this step.

Departures from the reference, by design: neighbours come from the memory *before* this
step's rows are written (the reference writes first, so a row's nearest neighbour is usually
its own copy); the OT assignment uses cost ``1 − cos`` (plan ∝ ``exp(−C/ε)``), not the
reference's ``exp(+distance/ε)``; no iBOT-style patch masking of the student input; OpTA (the
few-shot inference step) is not implemented.

``config.loss``: ``neg_weight`` λ_neg (0.1), ``temperature`` τ_u (2.0), ``momentum``
(0.995), ``momentum_schedule``, ``topk``, ``num_clusters``, ``memory_size``,
``memory_start``, ``epsilon``, ``sinkhorn_iterations``, ``centroid_momentum``,
``kmeans_iterations``, ``recluster_steps`` (0: cluster once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import beclr as beclr_losses
from contrastive_jax.objectives import image_ssl

MEMORIES = ("teacher", "pred", "proj")


class Beclr(image_ssl.ImageObjective):
  """BECLR objective (see the module docstring)."""

  batch_keys = ("views",)

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    if self.model.predictor is None:
      raise ValueError("BECLR needs a predictor: set config.model.predictor.")
    lc = config.loss
    self.neg_weight = lc.get("neg_weight", 0.1)
    self.temperature = lc.get("temperature", 2.0)
    self.momentum = lc.get("momentum", 0.995)
    self.momentum_schedule = lc.get("momentum_schedule", "cosine")
    self.total_steps = config.total_steps
    self.topk = lc.get("topk", 5)
    self.num_clusters = lc.num_clusters
    self.memory_size = lc.memory_size
    self.memory_start = lc.get("memory_start", 0)
    self.dyce = dict(epsilon=lc.get("epsilon", 0.05),
                     sinkhorn_iterations=lc.get("sinkhorn_iterations", 10),
                     momentum=lc.get("centroid_momentum", 0.0),
                     kmeans_iterations=lc.get("kmeans_iterations", 10))
    self.recluster_steps = lc.get("recluster_steps", 0)
    self.seed = config.seed
    num_views = config.data.views.ssl.get("num", 2)
    if num_views != 2:
      raise ValueError(f"BECLR contrasts two views; config.data.views.ssl.num={num_views}.")

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    dim = self.model.projector.out
    memory = {m: beclr_losses.dyce_init(self.memory_size, dim, self.num_clusters)
              for m in MEMORIES}
    state.update(step=jnp.zeros((), jnp.int32), memory=memory,
                 momentum={"params": params, "batch_stats": state["batch_stats"]})
    return params, state

  def _loss(self, rows, memory, enhanced, axis_name):
    """``rows[m]``: ``[b, 2, dim]`` per memory kind; the loss on the (enhanced) views."""
    views = {}
    for m in MEMORIES:
      pair = [rows[m][:, v] for v in range(2)]
      if enhanced:
        pair = [beclr_losses.enhance(x, beclr_losses.dyce_neighbours(memory[m], x, self.topk))
                for x in pair]
      views[m] = pair
    return beclr_losses.beclr_loss(
        *views["pred"], *views["teacher"], *views["proj"], neg_weight=self.neg_weight,
        temperature=self.temperature, axis_name=axis_name)

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # k-means keys come from config.seed and the step (device-invariant)
    step = state["step"]
    m = image_ssl.momentum_at(step, self.momentum, self.total_steps, self.momentum_schedule)
    momentum = {"params": image_ssl.ema_update(state["momentum"]["params"], params, m)}
    images = image_ssl.flatten_views(batch["views"])
    out, batch_stats = self.forward(params, state["batch_stats"], images, axis_name=axis_name)
    out_t, teacher_stats = self.forward(momentum["params"], state["momentum"]["batch_stats"],
                                        images, axis_name=axis_name)
    rows = {"teacher": jax.lax.stop_gradient(out_t["proj"]), "pred": out["pred"],
            "proj": out["proj"]}
    rows = {k: image_ssl.unflatten(v, 2) for k, v in rows.items()}  # [b, 2, dim]
    memory = state["memory"]
    enhance = (step >= self.memory_start) & (memory["teacher"]["clustered"] > 0)
    loss, metrics = jax.lax.cond(
        enhance, lambda: self._loss(rows, memory, True, axis_name),
        lambda: self._loss(rows, memory, False, axis_name))

    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    recluster = (step % self.recluster_steps == 0) if self.recluster_steps else False
    new_memory = {
        name: beclr_losses.dyce_update(
            memory[name], jnp.concatenate([rows[name][:, 0], rows[name][:, 1]]),
            key=jax.random.fold_in(key, i), recluster=recluster, axis_name=axis_name,
            **self.dyce)
        for i, name in enumerate(MEMORIES)}
    momentum["batch_stats"] = self.sync_state(teacher_stats, axis_name)
    metrics.update(momentum=m, enhanced=enhance.astype(jnp.float32))
    new_state = dict(state, step=step + 1, momentum=momentum, memory=new_memory,
                     batch_stats=self.sync_state(batch_stats, axis_name))
    return loss, (metrics, new_state)

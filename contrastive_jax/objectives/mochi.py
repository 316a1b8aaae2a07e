"""MoCo-v2 with MoCHi's hard negative mixing (METHODS.md §1.9).

The query encoder (``params``: backbone + projector) embeds view 0; the momentum encoder
(``objective_state['momentum']``: an EMA copy of the parameters and its own BatchNorm
statistics) embeds view 1 into keys, after its EMA update from the current query parameters
(MoCo's order). Queries are contrasted with their key, the queue and, from step
``mix_start`` on, MoCHi's synthetic hard negatives
(:func:`contrastive_jax.losses.moco.moco_loss`). Then the global batch of keys is gathered
and enqueued, so every device holds the same queue (``objective_state['queue']``).

Like MoCo-v2 the loss is asymmetric (view 0 queries, view 1 keys). Instead of MoCo's
shuffle-BN, the key encoder uses the config's BatchNorm mode (``"global"``: synchronised
moments, which MoCo-v3 uses in place of shuffling).

Mixing draws come from ``fold_in(objective_state['mix_rng'], step)`` and each query's global
row, so they do not depend on the number of devices.

``config.loss``: ``temperature`` (0.2), ``queue_size`` K_q, ``momentum`` (0.999),
``momentum_schedule`` (``constant`` | ``cosine``), ``num_hard`` N, ``num_mix`` s,
``num_query_mix`` s', ``mix_start`` (first step with mixing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import moco as moco_losses
from contrastive_jax.objectives import image_ssl


class Mochi(image_ssl.ImageObjective):
  """MoCo-v2 / MoCHi objective (see the module docstring)."""

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    lc = config.loss
    self.temperature = lc.get("temperature", 0.2)
    self.queue_size = lc.queue_size
    self.momentum = lc.get("momentum", 0.999)
    self.momentum_schedule = lc.get("momentum_schedule", "constant")
    self.total_steps = config.total_steps
    self.num_hard = lc.get("num_hard", 0)
    self.num_mix = lc.get("num_mix", 0)
    self.num_query_mix = lc.get("num_query_mix", 0)
    self.mix_start = lc.get("mix_start", 0)
    if (self.num_mix or self.num_query_mix) and not self.num_hard:
      raise ValueError("MoCHi mixing needs config.loss.num_hard ≥ 1.")

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    dim = self.model.projector.out
    state.update(step=jnp.zeros((), jnp.int32),
                 momentum={"params": params, "batch_stats": state["batch_stats"]},
                 queue=moco_losses.init_queue(self.queue_size, dim, jax.random.fold_in(rng, 1)),
                 mix_rng=jax.random.fold_in(rng, 2))
    return params, state

  def _moco(self, q, k, queue, rng, axis_name, mixing: bool):
    kwargs = dict(temperature=self.temperature, axis_name=axis_name)
    if mixing:
      kwargs.update(rng=rng, num_hard=self.num_hard, num_mix=self.num_mix,
                    num_query_mix=self.num_query_mix)
    loss, metrics = moco_losses.moco_loss(q, k, queue, **kwargs)
    metrics.setdefault("mix_logit", jnp.zeros((), jnp.float32))
    return loss, metrics

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng  # per device; the mixing draws use a replicated key and the global row instead
    step = state["step"]
    rng = jax.random.fold_in(state["mix_rng"], step)
    m = image_ssl.momentum_at(step, self.momentum, self.total_steps, self.momentum_schedule)
    momentum = {"params": image_ssl.ema_update(state["momentum"]["params"], params, m),
                "batch_stats": state["momentum"]["batch_stats"]}
    out_q, batch_stats = self.forward(params, state["batch_stats"], batch["views"][:, 0],
                                      axis_name=axis_name)
    out_k, key_stats = self.forward(momentum["params"], momentum["batch_stats"],
                                    batch["views"][:, 1], axis_name=axis_name)
    q, k = out_q["proj"], jax.lax.stop_gradient(out_k["proj"])
    queue = state["queue"]["keys"]
    if self.num_mix or self.num_query_mix:  # plain MoCo until mix_start
      loss, metrics = jax.lax.cond(
          step >= self.mix_start,
          lambda: self._moco(q, k, queue, rng, axis_name, True),
          lambda: self._moco(q, k, queue, rng, axis_name, False))
    else:
      loss, metrics = self._moco(q, k, queue, rng, axis_name, False)
    momentum["batch_stats"] = self.sync_state(key_stats, axis_name)
    new_state = dict(state, step=step + 1, momentum=momentum,
                     batch_stats=self.sync_state(batch_stats, axis_name),
                     queue=moco_losses.enqueue(state["queue"], k, axis_name=axis_name))
    metrics["momentum"] = m
    return loss, (metrics, new_state)

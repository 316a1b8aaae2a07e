"""The train state and the per-device train step (the same in ``jit`` and ``pmap`` mode)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from contrastive_jax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a run resumes from (the data position is ``step``).

  Attributes:
    step: int32 scalar, number of optimizer updates applied.
    params: the objective's model parameters (float32).
    opt_state: optax state.
    objective_state: the objective's explicit extra state (queues, prototypes, ...).
    rng: uint32 ``[2]`` base key; step ``t`` on device ``r`` uses ``fold_in(fold_in(rng, t), r)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  objective_state: Any
  rng: jax.Array


def create(objective, optimizer: optax.GradientTransformation, batch, seed: int) -> TrainState:
  """Initialises a state from a sample ``batch`` (only its shapes matter)."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  params, objective_state = objective.init(init_rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), objective_state=objective_state, rng=rng)


def train_step(state: TrainState, batch, *, objective, optimizer,
               axis_name: str = parallel.DATA_AXIS):
  """One optimizer update on the local shard ``batch``; returns ``(state, metrics)``.

  Runs per device inside ``shard_map`` or ``pmap``. The objective's loss is the global-batch
  loss, gradients are synchronised with :func:`parallel.sync_gradients`, and every device
  applies the same update, so the state stays replicated.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           jax.lax.axis_index(axis_name))

  def loss_fn(params):
    return objective.loss(params, state.objective_state, batch, rng, axis_name=axis_name)

  (loss, (metrics, objective_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = parallel.sync_gradients(grads, axis_name)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 param_norm=optax.global_norm(params))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            objective_state=objective_state)
  return new_state, metrics

"""The train state and the train steps.

* :func:`train_step`: written per device with an ``axis_name``; mapped by
  :func:`parallel.map_step` with ``shard_map`` (mode ``jit``) or ``pmap``.
* :func:`sharded_train_step`: the global-view step of objectives split into ``embed`` and
  ``contrast``: the model runs under the compiler's partitioning (replicated or FSDP-sharded
  parameters), the loss in ``shard_map`` with explicit collectives.
* :func:`make_step`: picks one from the config and compiles it.

Both accumulate gradients over ``accum_steps`` micro-batches with GradCache
(:mod:`contrastive_jax.accumulation`), which keeps the negatives global.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive_jax import accumulation, parallel, partitioning
from contrastive_jax.models import transformer
from contrastive_jax.objectives import base as objective_base


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
  """Initialises a state from a sample ``batch`` (only its shapes matter). Parameters are
  stored without flax's partitioning metadata (:func:`partitioning.unbox`)."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  params, objective_state = partitioning.unbox(objective.init(init_rng, batch))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), objective_state=objective_state, rng=rng)


def _finish(state: TrainState, loss, metrics, objective_state, grads, optimizer):
  """Applies the update and adds ``loss``, ``grad_norm``, ``param_norm`` to the metrics.

  With ``optimizer.skip_nonfinite`` (an ``optax.apply_if_finite`` state), a non-finite loss
  makes the gradients non-finite too, so that optax skips the step; a skipped step keeps the
  parameters and the objective state bit for bit (only ``step`` and optax's counters move)
  and the metrics gain ``skipped_nonfinite`` (total) and ``nonfinite_consecutive``.
  """
  guarded = isinstance(state.opt_state, optax.ApplyIfFiniteState)
  if guarded:
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if guarded:
    keep = lambda new, old: jnp.where(opt_state.last_finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    objective_state = jax.tree.map(keep, objective_state, state.objective_state)
    metrics = dict(metrics, skipped_nonfinite=opt_state.total_notfinite,
                   nonfinite_consecutive=opt_state.notfinite_count)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 param_norm=optax.global_norm(params))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            objective_state=objective_state)
  return new_state, metrics


def train_step(state: TrainState, batch, *, objective, optimizer,
               axis_name: str = parallel.DATA_AXIS, accum_steps: int = 1):
  """One optimizer update on the local shard ``batch``; returns ``(state, metrics)``.

  Runs per device inside ``shard_map`` or ``pmap``. The objective's loss is the global-batch
  loss, gradients are synchronised with :func:`parallel.sync_gradients`, and every device
  applies the same update, so the state stays replicated. ``accum_steps > 1`` (objectives
  split into ``embed`` / ``contrast`` only) splits the local shard into micro-batches.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                           jax.lax.axis_index(axis_name))
  if accum_steps > 1:
    (loss, (metrics, objective_state)), grads = accumulation.value_and_grad(
        lambda p, b: objective.embed(p, state.objective_state, b),
        lambda out: objective.contrast(out, state.objective_state, rng, axis_name=axis_name),
        state.params, batch, num_micro=accum_steps)
  else:
    def loss_fn(params):
      return objective.loss(params, state.objective_state, batch, rng, axis_name=axis_name)

    (loss, (metrics, objective_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
  grads = parallel.sync_gradients(grads, axis_name)
  return _finish(state, loss, metrics, objective_state, grads, optimizer)


def sharded_train_step(state: TrainState, batch, *, objective, optimizer, mesh,
                       accum_steps: int = 1):
  """One optimizer update on the global ``batch`` (sharded over ``parallel.BATCH_AXES``).

  ``objective.embed`` runs in the global view, partitioned by the compiler from the state's
  shardings (replicated or FSDP); ``objective.contrast`` runs per device in ``shard_map``
  over every device, with the same per-device ``rng`` as :func:`train_step`. The optimizer
  sees global gradients (no ``pmean`` needed) and updates the parameters where they live.
  """
  axes = parallel.BATCH_AXES
  step_rng = jax.random.fold_in(state.rng, state.step)

  def local_contrast(out, objective_state, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    return objective.contrast(out, objective_state, rng, axis_name=axes)

  def contrast(out):
    specs = {k: P() if v.ndim == 0 else P(axes) for k, v in out.items()}
    return jax.shard_map(local_contrast, mesh=mesh, in_specs=(specs, P(), P()),
                         out_specs=P())(out, state.objective_state, step_rng)

  rows = NamedSharding(mesh, P(axes))

  def embed(params, batch):
    with transformer.rows_sharding(rows):  # activations keep their rows split (FSDP)
      return objective.embed(params, state.objective_state, batch)

  if accum_steps > 1:
    constrain = lambda spec: (lambda t: jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)), t))
    (loss, (metrics, objective_state)), grads = accumulation.value_and_grad(
        embed, contrast, state.params, batch, num_micro=accum_steps, num_shards=mesh.size,
        constrain_micro=constrain(P(None, axes)), constrain_full=constrain(P(axes)))
  else:
    (loss, (metrics, objective_state)), grads = jax.value_and_grad(
        lambda p: contrast(embed(p, batch)), has_aux=True)(state.params)
  return _finish(state, loss, metrics, objective_state, grads, optimizer)


def make_step(config, objective, optimizer, mesh, shardings, *, donate_state: bool = True
              ) -> Callable:
  """The compiled train step ``run(state, local_batch) -> (state, metrics)`` for ``config``:
  :func:`sharded_train_step` for split objectives in mode ``jit``, else :func:`train_step`
  mapped by :func:`parallel.map_step`. ``shardings``: the state's
  (:func:`partitioning.state_shardings`)."""
  accum = config.parallel.get("accum_steps", 1)
  split = objective_base.is_split(objective)
  if accum > 1 and not split:
    raise ValueError(f"config.parallel.accum_steps={accum} needs an objective split into "
                     f"embed and contrast (objectives.base.Split); {config.objective!r} is not.")
  if config.batch_size % (mesh.size * accum):
    raise ValueError(f"config.batch_size={config.batch_size} does not split into "
                     f"config.parallel.accum_steps={accum} micro-batches on each of the "
                     f"{mesh.size} devices; use a multiple of {mesh.size * accum}.")
  if config.parallel.mode == "jit" and split:
    step = jax.jit(functools.partial(sharded_train_step, objective=objective,
                                     optimizer=optimizer, mesh=mesh, accum_steps=accum),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,) if donate_state else ())
    return lambda state, local_batch: step(state, parallel.to_global(local_batch, mesh))
  return parallel.map_step(
      functools.partial(train_step, objective=objective, optimizer=optimizer,
                        accum_steps=accum), mesh, config.parallel.mode,
      donate_state=donate_state)

"""The trainer: ``python -m contrastive_jax.train --config FILE[:ARGS] --workdir DIR``.

config -> tokenizer, objective, mesh, optimizer -> train state (fresh, or the newest complete
checkpoint in the workdir) -> loop: per-host batch -> mapped train step -> metrics, progress,
checkpoints, periodic evaluation. Re-running the same command resumes where it stopped.

Faults: a SIGTERM checkpoints the current step and exits with status 75
(:mod:`contrastive_jax.preemption`); a non-finite loss, gradient norm or parameter norm stops
the run (:class:`NonFiniteLossError`) without checkpointing it, unless
``config.optimizer.skip_nonfinite`` skips such steps (counted in ``train/skipped_nonfinite``).

Multi-host: every process runs the same command; ``--distributed`` (default ``auto``) joins
them with ``jax.distributed`` (:func:`parallel.initialize_distributed`); each host feeds its
own rows, process 0 writes the metrics and config, orbax writes checkpoints from all hosts.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Dict, Optional

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from clu import parameter_overview, periodic_actions
from ml_collections import config_flags

from contrastive_jax import (checkpointing, config_check, evaluate, optim, parallel,
                             partitioning, preemption, train_state, writers)
from contrastive_jax.data import pipeline, records, tokenizers
from contrastive_jax.objectives import base as objective_base, make_objective

class NonFiniteLossError(FloatingPointError):
  """Training stopped on a non-finite loss, gradient or parameter norm (or too many skipped
  steps in a row with ``config.optimizer.skip_nonfinite``)."""


def build(config):
  """The pieces shared by training and evaluation: tokenizer (None for image-only configs,
  which have no ``config.tokenizer``), objective, mesh, optimizer."""
  tokenizer = tokenizers.make_tokenizer(**config.tokenizer) if "tokenizer" in config else None
  objective = make_objective(config, tokenizer)
  mesh = parallel.make_mesh(config.parallel.data_axis_size,
                            fsdp=config.parallel.get("fsdp_axis_size", 1))
  parallel.check_batch_size(config.batch_size, mesh)
  optimizer = optim.make_optimizer(config.optimizer, config.total_steps,
                                   config.optimizer.get("logit_scale_max"))
  return tokenizer, objective, mesh, optimizer


def _init_sample(sample_batch):
  """One all-zero row shaped like ``sample_batch`` (initialisation only reads shapes; zeros
  make it the same on every host)."""
  return jax.tree.map(lambda x: np.zeros_like(x[:1]), sample_batch)


def state_shardings(config, objective, optimizer, sample_batch, mesh):
  """``(shardings, abstract_state)`` of the train state on ``mesh``: parameters and
  optimizer moments replicated, or FSDP-sharded when ``fsdp_axis_size > 1``
  (:mod:`contrastive_jax.partitioning`)."""
  sample = _init_sample(sample_batch)
  create = functools.partial(train_state.create, objective, optimizer, seed=config.seed)
  abstract = jax.eval_shape(create, sample)
  boxed_params = jax.eval_shape(objective.init, jax.random.PRNGKey(0), sample)[0]
  shardings = partitioning.state_shardings(
      abstract, partitioning.param_shardings(boxed_params, mesh), optimizer, mesh)
  return shardings, abstract


def initial_state(config, objective, optimizer, sample_batch, mesh, shardings=None):
  """A fresh train state, initialised once by a jitted function straight into its
  ``shardings`` (None: :func:`state_shardings`)."""
  if shardings is None:
    shardings, _ = state_shardings(config, objective, optimizer, sample_batch, mesh)
  create = functools.partial(train_state.create, objective, optimizer, seed=config.seed)
  return jax.jit(create, out_shardings=shardings)(_init_sample(sample_batch))


def _gather_hosts(value):
  """``[value of every process]`` (all processes must call it at the same point)."""
  if jax.process_count() == 1:
    return [value]
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in
          multihost_utils.process_allgather(_json_row(value))]


def _json_row(value, width: int = 4096) -> np.ndarray:
  data = json.dumps(value).encode()
  if len(data) > width:
    raise ValueError(f"Host data state too large to gather ({len(data)} bytes).")
  return np.frombuffer(data.ljust(width, b"\0"), np.uint8)


def resume_data_state(meta: Optional[dict]) -> Optional[dict]:
  """This host's data state saved in a checkpoint's ``meta`` (None: index-based sources, or a
  fresh run). A stream source resumed with another number of hosts cannot continue exactly
  and is refused."""
  position = (meta or {}).get("data_position")
  hosts = position.get("hosts") if isinstance(position, dict) else None
  if not hosts:
    return None
  if len(hosts) != jax.process_count():
    raise ValueError(f"The checkpoint was written by {len(hosts)} hosts reading their own "
                     f"parts of the data; this run has {jax.process_count()}. Resume with "
                     f"{len(hosts)} hosts (or start a new workdir).")
  return hosts[jax.process_index()]


def _data_scalars(host_state) -> Dict[str, float]:
  """Bad-record counters summed over hosts (``data/skipped_<reason>``, ...)."""
  if host_state is None:
    return {}
  totals: Dict[str, int] = {}
  for counts in (s["counts"] for s in _gather_hosts(host_state)):
    for name, n in counts.items():
      totals[name] = totals.get(name, 0) + n
  return {(f"data/{name}" if name == records.CONVERTED else f"data/skipped_{name}"): float(n)
          for name, n in totals.items()}


_COUNTERS = ("skipped_nonfinite", "nonfinite_consecutive")  # written as their last value
_CHECKED = ("loss", "grad_norm", "param_norm")


def _mean_metrics(history) -> Dict[str, float]:
  """Means over the steps of ``history`` (steps skipped as non-finite left out) and the last
  value of the skip counters."""
  stacked = jax.device_get(history)
  kept = [m for m in stacked if not m.get("nonfinite_consecutive", 0)]
  means = {k: float(np.mean([m[k] for m in kept])) for k in stacked[0]
           if k not in _COUNTERS and kept}
  return {**means, **{k: float(stacked[-1][k]) for k in _COUNTERS if k in stacked[-1]}}


def _check_finite(metrics, step: int, max_consecutive: int = 0) -> None:
  """Raises NonFiniteLossError naming ``step`` and the non-finite ones among ``loss``,
  ``grad_norm`` and ``param_norm``. A step the optimizer skipped (``skip_nonfinite``) only
  logs a warning, until more than ``max_consecutive`` in a row."""
  checked = {k: float(v) for k, v in jax.device_get(
      {k: metrics[k] for k in _CHECKED + _COUNTERS if k in metrics}).items()}
  bad = [k for k in _CHECKED if k in checked and not np.isfinite(checked[k])]
  in_a_row = int(checked.get("nonfinite_consecutive", 0))
  if not bad and not in_a_row:
    return
  if in_a_row and in_a_row <= max_consecutive and "param_norm" not in bad:
    logging.warning("Non-finite %s at step %d: update skipped (%d in a row, %d in all; "
                    "config.optimizer.max_consecutive_nonfinite=%d).", ", ".join(bad) or "loss",
                    step, in_a_row, int(checked["skipped_nonfinite"]), max_consecutive)
    return
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  why = (f"{in_a_row} non-finite steps in a row (more than config.optimizer."
         f"max_consecutive_nonfinite={max_consecutive}); " if in_a_row else "")
  raise NonFiniteLossError(
      f"Non-finite {', '.join(bad) or 'loss'} at step {step}: {why}metrics {values}. No "
      "checkpoint was written for it; the last good one is kept.")


def train_and_evaluate(config, workdir: str) -> Dict[str, float]:
  """Trains (resuming if the workdir has a checkpoint) and returns the final eval metrics.

  Raises:
    preemption.Preempted: a SIGTERM arrived (JAX's preemption notice with several
      processes); the step it stopped at is checkpointed and the writes are finished.
    NonFiniteLossError: a non-finite step (see :func:`_check_finite`); the newest checkpoint
      is the last good one.
  """
  config_check.validate(config)  # before anything is built or compiled
  config_check.check_resume(config, workdir)
  with preemption.Watcher(sync_every=config.log_every_steps) as watcher:
    return _train_and_evaluate(config, workdir, watcher)


def _train_and_evaluate(config, workdir: str, watcher: preemption.Watcher) -> Dict[str, float]:
  tokenizer, objective, mesh, optimizer = build(config)
  mngr = checkpointing.manager(workdir, keep=config.checkpoint.keep,
                               async_save=config.checkpoint.get("async_save", True))
  start_step = mngr.latest_step() or 0
  data_state = resume_data_state(checkpointing.read_meta(mngr, start_step) if start_step
                                 else None)
  batches = pipeline.as_numpy_batches(pipeline.train_dataset(
      config, tokenizer, start_step=start_step, data_state=data_state))
  first, bookkeeping = records.pop_bookkeeping(next(batches))
  local_rows = parallel.local_batch_size(config.batch_size)
  pipeline.validate_batch(first, objective.batch_keys, local_rows)

  shardings, _ = state_shardings(config, objective, optimizer, first, mesh)
  state = initial_state(config, objective, optimizer, first, mesh, shardings)
  if start_step:
    config_check.check_checkpoint_arrays(str(mngr.directory), start_step, state)
    state, meta = checkpointing.restore(mngr, state, start_step)
    logging.info("Resumed from step %d (data position %s).", start_step, meta["data_position"])
  else:  # statistics need every value on this host
    addressable = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
    parameter_overview.log_parameter_overview(state.params, include_stats=addressable)

  writer = writers.make_writer(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("%d processes, %d devices (%s), mesh %s, mode %s, global batch %d, "
               "%d micro-batches, parameters in memory per device: %.1f MB.",
               jax.process_count(), jax.device_count(), jax.devices()[0].platform,
               dict(mesh.shape), config.parallel.mode, config.batch_size,
               config.parallel.get("accum_steps", 1),
               partitioning.bytes_per_device(state.params) / 2**20)

  step_fn = train_state.make_step(config, objective, optimizer, mesh, shardings)
  total = config.total_steps
  progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=config.log_every_steps)

  encoders = evaluate.jitted_encoders(objective.model)

  def run_eval(step, t=None):
    del t
    with progress.timed("eval"):
      variables = objective_base.eval_variables(objective, state.params, state.objective_state)
      results = evaluate.run_evaluators(config, encoders, variables, tokenizer, mesh)
    writer.write_scalars(step, results)
    logging.info("Step %d evaluation: %s", step, json.dumps(results, sort_keys=True))
    return results

  periodic_eval = periodic_actions.PeriodicCallback(
      every_steps=config.eval.get("every_steps") or None, on_steps=[total], callback_fn=run_eval)
  max_nonfinite = (config.optimizer.get("max_consecutive_nonfinite", 10)
                   if config.optimizer.get("skip_nonfinite", False) else 0)
  history, pending, results, saved = [], None, {}, None
  batch, skipped_so_far = first, None

  def check_pending():  # each step's metrics are checked once, before anything relies on them
    nonlocal pending
    if pending is not None:
      _check_finite(*pending, max_consecutive=max_nonfinite)
      pending = None

  def save(step):  # only after check_pending(): no checkpoint of a non-finite state
    nonlocal saved
    position = {"step": step}
    if data_state is not None:  # stream sources: every host's next record and counters
      position["hosts"] = _gather_hosts(data_state)
    checkpointing.save(mngr, state, {"step": step, "data_position": position,
                                     "config": config.to_json_best_effort()})
    saved = step

  try:
    for step in range(start_step + 1, total + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        if batch is None:
          batch, bookkeeping = records.pop_bookkeeping(next(batches))
        started = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if step == start_step + 1:  # compilation + one step: big_vision's secs/update0
          jax.block_until_ready(metrics)
          first_step_s = time.perf_counter() - started
          logging.info("First step (compilation included): %.1f s.", first_step_s)
          writer.write_scalars(step, {"first_step_s": first_step_s})
        batch, data_state = None, records.host_state(bookkeeping) or data_state
      check_pending()  # the previous step: checked one step late, the device never waits
      pending = (metrics, step)
      history.append(metrics)
      progress(step)
      if step % config.log_every_steps == 0 or step == total:
        check_pending()
        data_scalars = _data_scalars(data_state)
        skipped = sum(v for k, v in data_scalars.items() if k.startswith("data/skipped_"))
        if skipped_so_far is not None and skipped > skipped_so_far:
          logging.warning("Bad input records skipped so far: %s", data_scalars)
        skipped_so_far = skipped
        writer.write_scalars(step, {**{f"train/{k}": v
                                       for k, v in _mean_metrics(history).items()},
                                    **data_scalars})
        history = []
      if step % config.checkpoint.every_steps == 0 or step == total:
        check_pending()
        save(step)
      if watcher.should_stop(step):  # every process, every step
        check_pending()
        if saved != step:
          save(step)
        mngr.wait_until_finished()
        logging.warning("Preempted at step %d; checkpoint written; exit status %d.", step,
                        preemption.EXIT_PREEMPTED)
        raise preemption.Preempted(step)
      if periodic_eval(step):
        results = periodic_eval.get_last_callback_result()
    if start_step >= total:
      logging.info("Nothing to train: checkpoint at step %d ≥ total_steps.", start_step)
      results = run_eval(start_step)
  finally:  # any exit leaves the newest checkpoint complete, never half written
    mngr.wait_until_finished()
    writer.flush()
  return results


def restore_variables(config, checkpoint_dir: str, step: Optional[int] = None):
  """Restores a run's evaluation variables without training data or a concrete initialisation.

  Returns ``(tokenizer, objective, mesh, variables, step)`` where ``variables`` are what the
  evaluators apply the model with (``{"params": ...}``, plus ``batch_stats`` for models with
  BatchNorm; :func:`objectives.base.eval_variables`); the state structure comes from
  ``config`` (abstract shapes only), so a checkpoint of another model shape fails clearly.
  """
  tokenizer, objective, mesh, optimizer = build(config)
  sample = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer).take(1)))
  shardings, abstract = state_shardings(config, objective, optimizer,
                                        records.pop_bookkeeping(sample)[0], mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  state, meta = checkpointing.restore(checkpointing.manager_at(checkpoint_dir), abstract, step)
  variables = objective_base.eval_variables(objective, state.params, state.objective_state)
  return tokenizer, objective, mesh, variables, meta["step"]


def main():
  config_flag = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
  distributed_flag = flags.DEFINE_enum(
      "distributed", "auto", parallel.DISTRIBUTED,
      "Join the other processes with jax.distributed: 'auto' when JAX_COORDINATOR_ADDRESS or a "
      "multi-task SLURM step is found, 'true' always (TPU VM pods), 'false' never.")
  heartbeat_flag = flags.DEFINE_integer(
      "heartbeat_timeout_s", 100,
      "Seconds without a heartbeat after which a lost process makes the others exit.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    del argv
    parallel.initialize_distributed(distributed_flag.value,
                                    heartbeat_timeout_s=heartbeat_flag.value)
    writers.quiet_library_logs()
    os.makedirs(workdir_flag.value, exist_ok=True)
    try:
      results = train_and_evaluate(config_flag.value, workdir_flag.value)
    except preemption.Preempted:  # logged; the checkpoint is written
      sys.exit(preemption.EXIT_PREEMPTED)
    if jax.process_index() == 0:
      print(json.dumps(results, indent=2, sort_keys=True))

  jax.config.config_with_absl()
  app.run(run, flags_parser=config_check.parse_flags)


if __name__ == "__main__":
  main()

"""Multi-host start, the device mesh, batch shardings and the ways of mapping a step.

The mesh has two axes, ``data`` and ``fsdp``; the batch is split over both (every device
holds different rows) and FSDP shards parameters over ``fsdp``
(:mod:`contrastive_jax.partitioning`). The per-device train step is written once, with an
``axis_name``; :func:`map_step` runs it

* ``mode='jit'``: ``jax.jit`` of ``jax.shard_map`` over the mesh (``NamedSharding``; what pjit
  became), with explicit collectives inside;
* ``mode='pmap'``: ``jax.pmap(axis_name='data')`` over the local devices.

Both give the same numbers (tested). Objectives split into ``embed`` and ``contrast`` run the
model under the compiler's partitioning instead, with only the loss in ``shard_map``
(:func:`contrastive_jax.train_state.sharded_train_step`). Inputs are global ``jax.Array``s
built from each host's local batch, so the same code runs on one CPU, on 8 simulated devices
and on every host of a pod.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both axes
MODES = ("jit", "pmap")
DISTRIBUTED = ("auto", "true", "false")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_STEP_NODELIST")


def distributed_arguments(mode: str, environ: Mapping[str, str]) -> Optional[dict]:
  """Keyword arguments of ``jax.distributed.initialize`` for this process, or None to run as
  a single process.

  ``mode='auto'`` joins when the environment says this is one of several processes:
  ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (the local
  launcher, or any hand-made setup), or a SLURM job step with more than one task (JAX's own
  SLURM detection then picks coordinator, process id and count). ``'true'`` always joins and
  lets JAX detect the cluster (TPU VM pods); ``'false'`` never does.
  """
  if mode not in DISTRIBUTED:
    raise ValueError(f"--distributed={mode!r}; expected one of {DISTRIBUTED}.")
  if mode == "false":
    return None
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(k)]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not.")
    return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(environ["JAX_NUM_PROCESSES"]),
                process_id=int(environ["JAX_PROCESS_ID"]))
  if all(k in environ for k in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    return {}
  return {} if mode == "true" else None


def initialize_distributed(mode: str = "auto", *, heartbeat_timeout_s: int = 100,
                           environ: Optional[Mapping[str, str]] = None) -> None:
  """Joins this process to the others with ``jax.distributed.initialize`` when
  :func:`distributed_arguments` says so, and logs where it runs.

  A process that stops sending heartbeats for ``heartbeat_timeout_s`` seconds (killed, host
  lost) makes every other process exit with an error instead of waiting forever in a
  collective.
  """
  kwargs = distributed_arguments(mode, os.environ if environ is None else environ)
  if kwargs is not None:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s, **kwargs)
  logging.info("Host %s: process %d of %d, %d local devices, %d devices in all (%s).",
               socket.gethostname(), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def make_mesh(data: Optional[int] = None, devices: Optional[Sequence[Any]] = None, *,
              fsdp: int = 1) -> Mesh:
  """A ``data × fsdp`` mesh (``data`` -1 or None: all devices over ``fsdp``).

  ``fsdp`` devices share each parameter's shards (1: parameters replicated). On TPUs the
  devices are ordered for the physical topology.
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.parallel.fsdp_axis_size={fsdp} does not divide the "
                     f"{len(devices)} devices.")
  if data in (None, -1):
    data = len(devices) // fsdp
  if not 0 < data * fsdp <= len(devices):
    raise ValueError(
        f"config.parallel.data_axis_size={data} × fsdp_axis_size={fsdp} needs more than the "
        f"{len(devices)} devices that exist; use data_axis_size=-1 for all devices.")
  shape = (data, fsdp)
  if devices[0].platform == "tpu" and data * fsdp == len(devices):
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:
    grid = np.asarray(devices[:data * fsdp]).reshape(shape)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device (``data`` and ``fsdp``); the rest
  replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, *, key: str = "config.batch_size",
                     accum_steps: int = 1) -> None:
  """Refuses a global batch (config ``key``) that does not split evenly over the mesh's
  devices, the hosts and ``accum_steps`` micro-batches
  (:func:`contrastive_jax.config_check.check_batch_size`; raises its ``ConfigError``, a
  ValueError)."""
  from contrastive_jax import config_check  # it imports this module
  config_check.check_batch_size(global_batch_size, num_devices=mesh.devices.size,
                                num_processes=jax.process_count(), accum_steps=accum_steps,
                                key=key)


def local_batch_size(global_batch_size: int) -> int:
  """Rows this host feeds per step."""
  return global_batch_size // jax.process_count()


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (leading axis = this host's rows) -> global sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def sync_gradients(grads: Any, axis_name: str = DATA_AXIS) -> Any:
  """Gradient of the global-batch loss on every device, in either mapping.

  Losses return the global loss (a ``psum`` of local terms). Under ``pmap`` the transpose of
  ``psum`` is ``psum``, so each device holds ``W ×`` its share of the gradient and ``pmean``
  yields the exact global gradient. Under ``shard_map`` (with replication checking) the
  gradient w.r.t. replicated parameters is already the global one and ``pmean`` of a
  device-invariant value is the identity. One call serves both.
  """
  return jax.lax.pmean(grads, axis_name)


def map_step(step_fn: Callable, mesh: Mesh, mode: str, *, donate_state: bool = True) -> Callable:
  """Maps ``step_fn(state, batch) -> (state, metrics)`` over the ``data`` axis.

  Returns ``run(state, local_batch)``: ``local_batch`` is this host's numpy batch (leading
  axis = this host's rows), ``state`` and the returned ``state`` / ``metrics`` are
  replicated pytrees. In ``jit`` mode the batch becomes a global array sharded on ``data``
  and the step runs under ``jax.shard_map``; in ``pmap`` mode it is split over the local
  devices of ``mesh``.
  """
  if mode not in MODES:
    raise ValueError(f"config.parallel.mode={mode!r}; expected one of {MODES}.")
  donate = (0,) if donate_state else ()
  if mesh.shape[FSDP_AXIS] > 1:
    raise ValueError(f"config.parallel.fsdp_axis_size={mesh.shape[FSDP_AXIS]} needs an objective "
                     "split into embed and contrast (objectives.base.Split) in mode 'jit'.")
  if mode == "jit":
    mapped = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                                   out_specs=(P(), P())), donate_argnums=donate)
    return lambda state, local_batch: mapped(state, to_global(local_batch, mesh))

  local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  pmapped = jax.pmap(step_fn, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=(None, None),
                     devices=None if mesh.devices.size == jax.device_count() else local_devices)
  num = len(local_devices)

  def run(state, local_batch):
    split = lambda x: np.asarray(x).reshape((num, x.shape[0] // num) + x.shape[1:])
    return pmapped(state, jax.tree.map(split, local_batch))

  return run

"""Device mesh, batch shardings and the two ways of mapping a per-device step.

The train step is written once, per device, with an ``axis_name``. :func:`map_step` runs it

* ``mode='jit'``: ``jax.jit`` of ``jax.shard_map`` over a ``Mesh`` whose ``data`` axis shards
  the batch (``NamedSharding``; what pjit became), with explicit collectives inside;
* ``mode='pmap'``: ``jax.pmap(axis_name='data')`` over the local devices.

Both give the same numbers (tested). Inputs are global ``jax.Array``s built from each
host's local batch, so the same code runs on one CPU, on 8 simulated devices and multi-host.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODES = ("jit", "pmap")


def make_mesh(num_devices: Optional[int] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``num_devices`` (-1 or None: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices in (None, -1):
    num_devices = len(devices)
  if not 0 < num_devices <= len(devices):
    raise ValueError(
        f"config.parallel.data_axis_size={num_devices} but only {len(devices)} devices exist; "
        "use -1 for all devices.")
  return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Refuses a global batch that does not split evenly over devices and hosts."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
        f"Global batch size {global_batch_size} does not divide by the {devices} devices of "
        f"the data axis; choose a multiple of {devices} (config.batch_size).")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"Global batch size {global_batch_size} does not divide by the "
        f"{jax.process_count()} processes.")


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

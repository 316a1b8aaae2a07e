"""orbax checkpoints in ``<workdir>/checkpoints``: save every N steps, keep K, resume newest.

A checkpoint is written to a temporary directory and renamed when complete (orbax's atomic
finalisation), so an interrupted save is never listed and a restart resumes from the newest
*complete* step. Each step holds the train state (``state``) and a JSON record (``meta``:
step, data position, config) that can be read without building the model.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """The manager a training run writes with (creates ``<workdir>/checkpoints``)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state", "meta"))


def manager_at(directory: str) -> ocp.CheckpointManager:
  """A read-only manager over an existing ``checkpoints`` directory (for evaluation)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory {directory}.")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, state: Any, meta: dict) -> bool:
  """Saves at ``state.step`` (the trainer decides when); returns whether orbax saved."""
  step = int(jax.device_get(state.step))
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, like_state: Any,
            step: Optional[int] = None) -> Tuple[Any, dict]:
  """Restores ``(state, meta)`` at ``step`` (newest when None) into ``like_state``'s structure,
  shapes, dtypes and shardings. Raises FileNotFoundError when there is nothing to restore."""
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"No complete checkpoint{'' if step is None else f' at step {step}'} "
                            f"in {mngr.directory}; available steps: {mngr.all_steps()}.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)  # keeps shardings
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record of the checkpoint at ``step`` (no arrays are read)."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

"""orbax checkpoints in ``<workdir>/checkpoints``: save every N steps, keep K, resume newest.

A checkpoint is written to a temporary directory (``<step>.orbax-checkpoint-tmp`` on a local
file system) and renamed when complete (orbax's atomic finalisation), so an interrupted save is
never listed and a restart resumes from the newest *complete* step. :func:`manager` warns about
each interrupted write it finds (orbax then deletes it) and names the step the run resumes
from. Each step holds the train state (``state``) and a JSON record (``meta``: step, data
position, config) that can be read without building the model.

Fault injection, for tests only: with the environment variable
``CONTRASTIVE_JAX_KILL_DURING_SAVE=<step>`` set, :func:`save` sends SIGKILL to its own process
right after starting the (asynchronous) save of ``<step>``, leaving an interrupted write.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any, List, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp

KILL_DURING_SAVE_ENV = "CONTRASTIVE_JAX_KILL_DURING_SAVE"


def interrupted_writes(directory: str) -> List[str]:
  """Paths of the unfinished checkpoint writes in ``directory`` (orbax's own test: temporary
  names, or final names without their commit marker on object stores), sorted."""
  if not os.path.isdir(directory):
    return []
  return sorted(str(p.get()) for p in ocp.path.step.all_temporary_paths(directory))


def _warn_interrupted(mngr: ocp.CheckpointManager, paths: List[str]) -> None:
  steps = [int(m.group(1)) for m in (re.match(r"(\d+)", os.path.basename(p)) for p in paths)
           if m]
  latest = mngr.latest_step()
  logging.warning(
      "Interrupted checkpoint write%s (removed): %s%s. Resuming from the newest complete "
      "checkpoint: %s.", "s" if len(paths) > 1 else "", ", ".join(paths),
      f" (step {', '.join(map(str, steps))})" if steps else "",
      "none, starting from step 0" if latest is None else f"step {latest}")


def manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """The manager a training run writes with (creates ``<workdir>/checkpoints``)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  interrupted = interrupted_writes(directory)  # before orbax starts deleting them
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  mngr = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
  if interrupted:
    _warn_interrupted(mngr, interrupted)
  return mngr


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
  saved = mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):  # fault injection for tests only
    os.kill(os.getpid(), signal.SIGKILL)
  return saved


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

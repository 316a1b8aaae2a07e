"""Preemption: a SIGTERM makes the trainer checkpoint the current step and exit with status 75.

Cluster schedulers announce an eviction with SIGTERM and kill the job with SIGKILL a grace
period later (SLURM on ``scancel``, time limit or preemption; Kubernetes; spot / preemptible
cloud VMs; TPU queued resources). The trainer installs a :class:`Watcher` for the length of
the run and asks ``should_stop(step)`` after every step; on True it writes a checkpoint of that
step, waits for it, and raises :class:`Preempted`. The command line exits with
:data:`EXIT_PREEMPTED` (75, sysexits' ``EX_TEMPFAIL``: "try again"); re-running the same command
resumes from that checkpoint.

Several processes must all stop at the same step (a checkpoint save is collective):

* ``jax.distributed`` initialised with JAX's preemption service (the default,
  ``jax_enable_preemption_service``): ``jax.distributed.initialize`` already installed JAX's
  own SIGTERM notifier, which tells the coordination service; the hosts then agree on a step
  (one past the largest step any host has reported) and
  ``multihost_utils.reached_preemption_sync_point(step)``, called by every host at every step,
  is True on all of them at that step. The watcher installs no Python handler there (it would
  replace JAX's and hide the notice).
* Otherwise (one process, or the preemption service turned off) a Python handler turns SIGTERM
  into a flag; with several processes the flags are all-gathered every ``sync_every`` steps
  and all hosts stop when any has one.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, run the command again


class Preempted(Exception):
  """Training stopped on a preemption notice after checkpointing ``step``."""

  def __init__(self, step: int):
    super().__init__(f"Preempted at step {step}; checkpoint written; exit status "
                     f"{EXIT_PREEMPTED}.")
    self.step = step


def _jax_sync_manager() -> Any:
  """JAX's preemption sync manager when ``jax.distributed`` runs with it, else None."""
  from jax._src import distributed  # the state multihost_utils itself reads
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


class Watcher:
  """Turns SIGTERM into a stop request honoured at a step boundary (see the module docstring).

  Use as a context manager (or :meth:`install` / :meth:`restore`); the previous SIGTERM
  handler is put back on exit. Outside the main thread no handler can be installed: a warning
  says so and SIGTERM keeps its previous effect.

  Args:
    sync_every: steps between all-gathers of the flag when several processes run without
      JAX's preemption service.
  """

  def __init__(self, sync_every: int = 10):
    self.sync_every = max(1, int(sync_every))
    self.requested = False
    self.mode = None  # "jax" (JAX's sync point) or "flag" (this module's handler)
    self._previous = None
    self._installed = False

  def install(self) -> "Watcher":
    self.requested = False
    self.mode = "jax" if _jax_sync_manager() is not None else "flag"
    if self.mode == "flag":
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
      else:
        logging.warning("Not in the main thread: SIGTERM is not turned into a checkpoint.")
    return self

  def restore(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def __enter__(self) -> "Watcher":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    logging.warning("SIGTERM received: the run stops after the current step with a checkpoint.")

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint ``step`` and stop; every process must call it after every step
    (the same answer on all of them)."""
    if self.mode == "jax":
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() == 1:
      return self.requested
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

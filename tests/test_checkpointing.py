"""orbax round trip of the full train state, newest-complete selection, clear errors."""

import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from contrastive_jax import checkpointing, train
from contrastive_jax.data import pipeline


def test_save_restore_round_trip_is_exact(tmp_path):
  config = tiny_config()
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  # Make every leaf distinctive (non-trivial optimizer moments and step).
  state = jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state)
  state = state.replace(step=state.step + 7)
  mngr = checkpointing.manager(str(tmp_path), keep=2, async_save=False)
  assert checkpointing.save(mngr, state, {"step": 7, "data_position": 7})
  mngr.wait_until_finished()

  fresh = train.initial_state(config, objective, optimizer, batch, mesh)
  restored, meta = checkpointing.restore(checkpointing.manager_at(str(tmp_path / "checkpoints")),
                                         fresh)
  assert meta == {"step": 7, "data_position": 7}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(a, b)


def test_incomplete_checkpoint_is_ignored_and_missing_is_an_error(tmp_path):
  config = tiny_config()
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  mngr = checkpointing.manager(str(tmp_path), keep=3, async_save=False)
  checkpointing.save(mngr, state, {"step": 0, "data_position": 0})
  mngr.wait_until_finished()
  # A save that died half way leaves only orbax's temporary directory.
  os.makedirs(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp" / "state")
  assert checkpointing.manager_at(str(tmp_path / "checkpoints")).latest_step() == 0
  with pytest.raises(FileNotFoundError, match="step 9"):
    checkpointing.restore(checkpointing.manager_at(str(tmp_path / "checkpoints")), state, 9)
  with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
    checkpointing.manager_at(str(tmp_path / "nothing"))

"""The train steps: the global-view step (model partitioned by the compiler, loss in
shard_map) vs the per-device step in shard_map vs pmap vs one device, and mesh checks."""

import functools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from contrastive_jax import parallel, train, train_state
from contrastive_jax.data import pipeline


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  step = functools.partial(train_state.train_step, objective=objective, optimizer=optimizer)
  return config, step, state, batch, mesh, (config, objective, optimizer)


def _run(step, state, batch, mesh, mode, n=2):
  if mode == "sharded":  # what the trainer runs for CLIP in mode 'jit'
    config, objective, optimizer = step
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    fn = train_state.make_step(config, objective, optimizer, mesh, shardings,
                               donate_state=False)
  else:
    fn = parallel.map_step(step, mesh, mode, donate_state=False)
  out = []
  for _ in range(n):
    state, metrics = fn(state, batch)
    out.append(jax.device_get(metrics))
  return jax.device_get(state), out


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_jit_and_pmap_steps_agree(setup):
  _, step, state, batch, mesh, _ = setup
  jit_state, jit_metrics = _run(step, state, batch, mesh, "jit")
  pmap_state, pmap_metrics = _run(step, state, batch, mesh, "pmap")
  _assert_close(jit_metrics, pmap_metrics)
  _assert_close(jit_state.params, pmap_state.params)
  _assert_close(jit_state.opt_state, pmap_state.opt_state)
  assert int(jit_state.step) == int(pmap_state.step) == 2
  # The step really moved the parameters.
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(jit_state.params), jax.tree.leaves(jax.device_get(state.params))))
  assert moved > 1e-4


def test_sharded_step_matches_the_per_device_step(setup):
  """Model under the compiler's partitioning + loss in shard_map == all in shard_map."""
  _, step, state, batch, mesh, pieces = setup
  per_device, per_device_metrics = _run(step, state, batch, mesh, "jit")
  sharded, sharded_metrics = _run(pieces, state, batch, mesh, "sharded")
  _assert_close(sharded_metrics, per_device_metrics)
  _assert_close(sharded.params, per_device.params)


def test_eight_devices_match_one_device(setup):
  """The global-batch gradient does not depend on how the batch is split."""
  _, step, state, batch, mesh, _ = setup
  eight_state, eight_metrics = _run(step, state, batch, mesh, "jit", n=1)
  one = parallel.make_mesh(1)
  one_state, one_metrics = _run(step, jax.device_put(jax.device_get(state),
                                                     parallel.replicated(one)),
                                batch, one, "jit", n=1)
  _assert_close(eight_metrics, one_metrics, rtol=1e-4, atol=1e-5)
  _assert_close(eight_state.params, one_state.params, rtol=1e-4, atol=1e-5)


def test_mesh_and_batch_checks():
  with pytest.raises(ValueError, match="needs more than the 8 devices"):
    parallel.make_mesh(16)
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    parallel.check_batch_size(20, parallel.make_mesh())
  parallel.check_batch_size(24, parallel.make_mesh())
  with pytest.raises(ValueError, match="mode"):
    parallel.map_step(lambda s, b: (s, {}), parallel.make_mesh(), "pjit")

"""Image-only objectives through the real train step: device-count and jit/pmap parity with
BatchNorm, momentum encoder, queue and MoCHi mixing; SwAV prototype freezing; the objective
state (queue, EMA encoder, batch statistics) through a checkpoint; kNN / linear-probe
evaluation in training and through the evaluate command."""

import functools
import json

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_STEPS, run_module, tiny_config
from contrastive_jax import checkpointing, parallel, train, train_state
from contrastive_jax.data import pipeline


def _setup(name, **overrides):
  config = tiny_config(name, **overrides)
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  step = functools.partial(train_state.train_step, objective=objective, optimizer=optimizer)
  return config, objective, step, state, batch, mesh


def _run(step, state, batch, mesh, mode="jit", n=2):
  fn = parallel.map_step(step, mesh, mode, donate_state=False)
  states, metrics = [], []
  for _ in range(n):
    state, m = fn(state, batch)
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return states, metrics


def _on_one_device(state):
  return jax.device_put(jax.device_get(state), parallel.replicated(parallel.make_mesh(1)))


def _assert_close(a, b, rtol=2e-4, atol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mochi():
  # Mixing from the first step; the queue holds 4 global batches.
  return _setup("mochi_shapes", **{"loss.mix_start": 0, "optimizer.warmup_steps": 0})


def test_mochi_eight_devices_match_one_device_and_pmap(mochi):
  """Global BN in both encoders, EMA, the queue and the mixing draws do not depend on how
  the batch is split nor on the mapping."""
  _, _, step, state, batch, mesh = mochi
  eight, eight_metrics = _run(step, state, batch, mesh, "jit")
  one, one_metrics = _run(step, _on_one_device(state), batch, parallel.make_mesh(1), "jit")
  pmapped, _ = _run(step, state, batch, mesh, "pmap")
  assert float(eight_metrics[1]["mix_logit"]) != 0.0  # the synthetic negatives are in use
  for other in (one, pmapped):
    _assert_close(eight[-1].params, other[-1].params)
    _assert_close(eight[-1].objective_state, other[-1].objective_state)
  for a, b in zip(eight_metrics, one_metrics):
    acc_a, acc_b = a.pop("acc"), b.pop("acc")  # argmax-based: near ties may flip one row
    assert abs(acc_a - acc_b) <= 1 / 16 + 1e-6
    _assert_close(a, b)
  queue = eight[-1].objective_state["queue"]
  assert int(queue["ptr"]) == 2 * 16 % 64
  # FIFO: step 1 wrote rows [0, 16), step 2 rows [16, 32); the rest is the initial queue.
  first = eight[0].objective_state["queue"]["keys"]
  initial = jax.device_get(state.objective_state["queue"]["keys"])
  np.testing.assert_array_equal(queue["keys"][:16], first[:16])
  assert not np.allclose(queue["keys"][16:32], initial[16:32])
  np.testing.assert_array_equal(queue["keys"][32:], initial[32:])
  # The EMA moved towards the trained parameters, slowly (m = 0.99).
  ema = jax.tree.leaves(eight[-1].objective_state["momentum"]["params"])
  init = jax.tree.leaves(state.params)
  trained = jax.tree.leaves(eight[-1].params)
  moved = [np.abs(e - i).max() for e, i in zip(ema, init)]
  assert max(moved) > 0
  assert max(moved) < max(np.abs(t - i).max() for t, i in zip(trained, init))


def test_objective_state_round_trips_through_a_checkpoint(mochi, tmp_path):
  config, objective, step, state, batch, mesh = mochi
  states, _ = _run(step, state, batch, mesh, "jit", n=1)
  after_one = jax.device_put(states[0], parallel.replicated(mesh))
  mngr = checkpointing.manager(str(tmp_path), keep=1, async_save=False)
  assert checkpointing.save(mngr, after_one, {"step": 1, "data_position": 1})
  mngr.wait_until_finished()
  restored, _ = checkpointing.restore(checkpointing.manager_at(str(tmp_path / "checkpoints")),
                                      state)
  _assert_close(restored, after_one, rtol=0, atol=0)
  continued, _ = _run(step, after_one, batch, mesh, "jit", n=1)
  resumed, _ = _run(step, restored, batch, mesh, "jit", n=1)
  _assert_close(continued[0], resumed[0], rtol=0, atol=0)


def test_per_device_batch_norm_depends_on_the_split():
  """Unlike global BN (see the MoCHi parity test), per-device moments change the update; the
  averaged running statistics keep the state replicated (shard_map's out_specs=P())."""
  config, objective, step, state, batch, mesh = _setup(
      "simclr_shapes", **{"model.batch_norm": "device", "optimizer.warmup_steps": 0})
  per_device, _ = _run(step, state, batch, mesh, "jit", n=1)
  one, _ = _run(step, _on_one_device(state), batch, parallel.make_mesh(1), "jit", n=1)
  leaves = lambda s: jax.tree.leaves(s.params)
  assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(leaves(per_device[0]),
                                                               leaves(one[0])))
  assert jax.tree.leaves(per_device[0].objective_state["batch_stats"])


def test_swav_prototypes_stay_frozen_and_on_the_sphere():
  config, _, step, state, batch, mesh = _setup("swav_shapes", **{"optimizer.learning_rate": 1e-2,
                                                                   "optimizer.warmup_steps": 0})
  frozen = config.optimizer.freeze["prototypes"]
  states, _ = _run(step, state, batch, mesh, "jit", n=frozen + 1)
  start = np.asarray(state.params["prototypes"])
  np.testing.assert_allclose(np.linalg.norm(start, axis=1), 1.0, rtol=1e-6)
  for s in states[:frozen]:
    np.testing.assert_array_equal(s.params["prototypes"], start)
  assert not np.allclose(states[0].params["projector"]["dense_1"]["kernel"],
                         state.params["projector"]["dense_1"]["kernel"])
  moved = np.asarray(states[frozen].params["prototypes"])
  assert not np.allclose(moved, start)
  np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
  config = tiny_config("simclr_shapes", **{"eval.every_steps": TINY_STEPS // 2})
  workdir = str(tmp_path_factory.mktemp("simclr_run"))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_knn_during_training_and_through_the_evaluate_command(simclr_run, tmp_path):
  config, workdir, results = simclr_run
  assert set(results) == {"knn/shapes/acc1", "knn/shapes/acc5", "knn/shapes/mean_per_class_recall"}
  with open(f"{workdir}/metrics.jsonl") as f:
    evals = [row["step"] for row in map(json.loads, f) if "knn/shapes/acc1" in row]
  assert evals == [TINY_STEPS // 2, TINY_STEPS]
  output = tmp_path / "metrics.json"
  proc = run_module(["contrastive_jax.evaluate",
                     f"--config={REPO}/configs/simclr_shapes.py:size=tiny,steps={TINY_STEPS}",
                     f"--workdir={workdir}", f"--output={output}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = json.loads(output.read_text())
  for key, value in results.items():  # the restored BatchNorm statistics are used
    assert written[key] == pytest.approx(value, abs=1e-6), key

"""Training at scale, in one process on 8 devices: FSDP, GradCache accumulation, bfloat16
compute, rematerialisation, and the multi-host start's settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from contrastive_jax import accumulation, parallel, partitioning, train, train_state
from contrastive_jax.data import pipeline


def _config(name="clip_shapes", **overrides):
  """Tiny config with 32 rows: 4 per device, so 4 micro-batches of 1 row per device."""
  return tiny_config(name, batch_size=32, **overrides)


def _setup(config):
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  shardings, _ = train.state_shardings(config, objective, optimizer, batch, mesh)
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  step = train_state.make_step(config, objective, optimizer, mesh, shardings,
                               donate_state=False)
  return state, step, batch


def _run(config, steps=2):
  state, step, batch = _setup(config)
  history, initial = [], jax.device_get(state.params)
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history, initial


def _close(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def replicated_run():
  """Two steps of tiny CLIP, parameters replicated, full batch: the reference
  ``(state, metrics history, initial parameters)``."""
  return _run(_config())


def test_fsdp_shards_parameters_and_optimizer_and_matches_replicated(replicated_run):
  config = _config(**{"parallel.fsdp_axis_size": 4})
  state, history, initial = _run(config)
  ref_state, ref_history, _ = replicated_run
  kernel = state.params["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 4, kernel.shape[1])
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
  assert len(moments) >= 2 and all(m.sharding == kernel.sharding for m in moments)
  sharded = partitioning.bytes_per_device(state.params)
  full = partitioning.bytes_per_device(ref_state.params)
  assert sharded < 0.4 * full, (sharded, full)  # embed-width kernels hold almost all bytes
  _close(history, ref_history, rtol=1e-5, atol=1e-5)
  _close(state.params, ref_state.params, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,mode", [("clip_shapes", "jit"), ("clip_shapes", "pmap"),
                                       ("filip_shapes", "jit")])
def test_gradcache_over_four_micro_batches_equals_the_full_batch_step(name, mode,
                                                                        replicated_run):
  if name == "clip_shapes":  # jit == pmap for the full batch is tested in test_parallel.py
    full_state, full_history, _ = replicated_run
  else:
    full_state, full_history, _ = _run(_config(name, **{"parallel.mode": mode}))
  state, history, initial = _run(_config(name, **{"parallel.mode": mode,
                                             "parallel.accum_steps": 4}))
  _close(history, full_history, rtol=1e-5, atol=1e-5)
  _close(state.params, full_state.params, rtol=1e-5, atol=1e-5)
  moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(initial)))
  assert moved > 1e-4  # the steps did move the parameters


def test_micro_batches_take_rows_from_every_shard_and_merge_back():
  x = np.arange(32)  # 4 shards of 8 rows, 2 micro-batches of 4 rows per shard
  micro = accumulation.split_microbatches(x, 2, 4)
  assert micro.shape == (2, 16)
  np.testing.assert_array_equal(micro[0][:4], [0, 1, 2, 3])
  np.testing.assert_array_equal(micro[0][4:8], [8, 9, 10, 11])
  np.testing.assert_array_equal(micro[1][:4], [4, 5, 6, 7])
  np.testing.assert_array_equal(accumulation.merge_microbatches(micro, 4), x)
  with pytest.raises(ValueError, match="accum_steps"):
    accumulation.split_microbatches(np.zeros(12), 4, 2)


def test_bfloat16_compute_keeps_float32_parameters_and_loss(replicated_run):
  state, history, initial = _run(_config(**{"model.dtype": "bfloat16"}), steps=4)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert history[0]["loss"].dtype == np.float32
  _, ref_history, _ = replicated_run
  np.testing.assert_allclose(history[0]["loss"], ref_history[0]["loss"], rtol=2e-2)
  assert history[-1]["loss"] < history[0]["loss"] - 0.01  # the same batch: it must fall


def test_remat_gives_the_same_gradients_with_the_same_parameters():
  config = _config()
  tokenizer, objective, _, _ = train.build(config)
  remat = train.build(_config(**{"model.remat": True}))[1]
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  params = partitioning.unbox(objective.init(jax.random.PRNGKey(0), batch)[0])
  assert jax.tree.structure(params) == jax.tree.structure(
      partitioning.unbox(remat.init(jax.random.PRNGKey(0), batch)[0]))
  grad = lambda obj: jax.jit(jax.grad(lambda p: obj.loss(p, {}, batch, None)[0]))(params)
  _close(grad(remat), grad(objective), rtol=1e-5, atol=1e-7)


def test_scale_settings_are_checked():
  with pytest.raises(ValueError, match="fsdp_axis_size=3"):
    parallel.make_mesh(fsdp=3)
  config = _config("simclr_shapes", **{"parallel.accum_steps": 2})
  tokenizer, objective, mesh, optimizer = train.build(config)
  with pytest.raises(ValueError, match="accum_steps=2 needs an objective split"):
    train_state.make_step(config, objective, optimizer, mesh, None)
  config = _config("simclr_shapes", **{"parallel.fsdp_axis_size": 2})
  tokenizer, objective, mesh, optimizer = train.build(config)
  with pytest.raises(ValueError, match="fsdp_axis_size=2 needs an objective"):
    train_state.make_step(config, objective, optimizer, mesh, None)
  config = _config(**{"parallel.fsdp_axis_size": 8, "model.image.width": 36})
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  with pytest.raises(ValueError,
                     match=r"Parameter .*image_proj.* \(36, 32\) cannot be split over fsdp=8"):
    train.state_shardings(config, objective, optimizer, batch, mesh)


SLURM = dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1",
             SLURM_STEP_NODELIST="node[01-02]")


@pytest.mark.parametrize("mode,environ,expected", [
    ("auto", {}, None),
    ("auto", dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:1234", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID="1"),
     dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)),
    ("auto", SLURM, {}),  # JAX's SLURM detection fills in the rest
    ("auto", dict(SLURM, SLURM_NTASKS="1"), None),  # one task: nothing to join
    ("true", {}, {}),  # TPU pods: JAX detects the slice
    ("false", SLURM, None),
])
def test_distributed_arguments(mode, environ, expected):
  assert parallel.distributed_arguments(mode, environ) == expected


def test_distributed_arguments_name_what_is_missing():
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    parallel.distributed_arguments("auto", dict(JAX_COORDINATOR_ADDRESS="h:1",
                                                JAX_NUM_PROCESSES="2"))
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    parallel.distributed_arguments("maybe", {})

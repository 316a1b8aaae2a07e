"""Shared by the config tests: the configs in configs/ and a few jitted training steps."""

import functools

import jax
import numpy as np

from conftest import REPO, load_config
from contrastive_jax import parallel, train, train_state
from contrastive_jax.data import pipeline

# Configs on real data (shards, TFDS) need their data: tests/test_train_streams.py.
REAL_DATA_CONFIGS = ("clip_shards", "clip_coco")
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                 if p.stem not in REAL_DATA_CONFIGS)
IMAGE_ONLY = tuple(n for n in CONFIGS if "tokenizer" not in load_config(n, "size=tiny"))
IMAGE_TEXT = tuple(n for n in CONFIGS if n not in IMAGE_ONLY)


def first_steps(config, steps=4):
  """``steps`` training steps on one batch, on 8 devices: ``(losses, objective, state,
  batch)``."""
  tokenizer, objective, mesh, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  pipeline.validate_batch(batch, objective.batch_keys, config.batch_size)
  state = train.initial_state(config, objective, optimizer, batch, mesh)
  step = parallel.map_step(functools.partial(train_state.train_step, objective=objective,
                                             optimizer=optimizer), mesh, "jit")
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, objective, state, batch


def assert_trains(name):
  """The tiny config takes finite steps on the same batch and its loss falls."""
  config = load_config(name, "size=tiny")
  config.optimizer.warmup_steps, config.optimizer.learning_rate = 0, 1e-3
  losses, objective, state, batch = first_steps(config)
  assert np.isfinite(losses).all()
  if config.objective == "mochi":
    # The batch's own keys are in the queue after one step, so its loss may rise: compare the
    # trained and the initial parameters against the same (final) queue and encoder instead.
    params0, _ = objective.init(jax.random.split(jax.random.PRNGKey(config.seed))[0], batch)
    rng = jax.random.PRNGKey(1)
    state = jax.tree.map(jax.numpy.asarray, jax.device_get(state))
    before, _ = objective.loss(params0, state.objective_state, batch, rng)
    after, _ = objective.loss(state.params, state.objective_state, batch, rng)
    assert after < before - 0.01, (before, after)
  else:
    assert losses[-1] < losses[0] - 0.01, losses  # the same batch again and again: it must fall

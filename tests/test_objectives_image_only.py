"""Every image-only config: one per method trains for a few steps on 8 devices; its twins on
other data (``<method>_fashion_mnist`` next to ``<method>_shapes``) are validated, built and
traced (shapes of the state and the loss), which catches their own settings without paying
for another compilation."""

import jax
import numpy as np
import pytest

from conftest import load_config
from contrastive_jax import config_check, train
from contrastive_jax.data import pipeline
from objective_steps import IMAGE_ONLY, assert_trains

DATASETS = ("_shapes", "_fashion_mnist")


def _method(name):
  for suffix in DATASETS:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _trained():
  """One config per method, the shapes one when there is one."""
  chosen = {}
  for name in sorted(IMAGE_ONLY, key=lambda n: (not n.endswith("_shapes"), n)):
    chosen.setdefault(_method(name), name)
  return tuple(sorted(chosen.values()))


TRAINED = _trained()
TRACED = tuple(n for n in IMAGE_ONLY if n not in TRAINED)


@pytest.mark.parametrize("name", TRAINED)
def test_config_trains(name):
  assert_trains(name)


@pytest.mark.parametrize("name", TRACED)
def test_config_builds_and_traces(name):
  config = load_config(name, "size=tiny")
  config_check.validate(config, num_devices=jax.device_count())
  tokenizer, objective, _, _ = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  pipeline.validate_batch(batch, objective.batch_keys, config.batch_size)
  params, state = jax.eval_shape(objective.init, jax.random.PRNGKey(0), batch)
  loss, (metrics, new_state) = jax.eval_shape(
      lambda p, s: objective.loss(p, s, batch, jax.random.PRNGKey(1)), params, state)
  assert loss.shape == () and np.issubdtype(loss.dtype, np.floating)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state)
  assert all(m.shape == () for m in jax.tree.leaves(metrics))


def test_every_method_is_trained():
  assert {_method(n) for n in TRAINED} == {_method(n) for n in IMAGE_ONLY}
  assert "simclr_fashion_mnist" in TRACED and "simclr_shapes" in TRAINED

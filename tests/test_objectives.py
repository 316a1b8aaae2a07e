"""Every config builds its objective and takes a finite, learning step on 8 devices."""

import functools
import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from contrastive_jax import parallel, train, train_state
from contrastive_jax.data import pipeline

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def _first_steps(config, steps=4):
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


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains(name):
  config = load_config(name, "size=tiny")
  config.optimizer.warmup_steps, config.optimizer.learning_rate = 0, 1e-3
  losses, _, _, _ = _first_steps(config)
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.01, losses  # the same batch again and again: it must fall


def test_convirt_at_half_weight_equals_clip_at_the_same_scale():
  clip = load_config("clip_shapes", "size=tiny")
  clip.model.logit_scale_init = float(np.log(10.0))
  convirt = load_config("convirt_shapes", "size=tiny")
  convirt.loss.temperature, convirt.loss.i2t_weight = 0.1, 0.5
  _, clip_obj, _, batch = _first_steps(clip, steps=1)
  convirt_obj = train.build(convirt)[1]
  rng = jax.random.PRNGKey(0)
  params = jax.device_get(clip_obj.init(rng, batch)[0])
  a, _ = clip_obj.loss(params, {}, batch, rng)
  b, _ = convirt_obj.loss(params, {}, batch, rng)
  np.testing.assert_allclose(a, b, rtol=1e-6)

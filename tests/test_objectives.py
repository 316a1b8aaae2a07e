"""Every image-text config builds its objective and takes finite, learning steps on 8 devices
(image-only configs: tests/test_objectives_image_only.py)."""

import jax
import numpy as np
import pytest

from conftest import load_config
from contrastive_jax import parallel, train
from contrastive_jax.data import pipeline
from objective_steps import IMAGE_TEXT, assert_trains, first_steps


@pytest.mark.parametrize("name", IMAGE_TEXT)
def test_config_trains(name):
  assert_trains(name)


def test_convirt_at_half_weight_equals_clip_at_the_same_scale():
  clip = load_config("clip_shapes", "size=tiny")
  clip.model.logit_scale_init = float(np.log(10.0))
  convirt = load_config("convirt_shapes", "size=tiny")
  convirt.loss.temperature, convirt.loss.i2t_weight = 0.1, 0.5
  _, clip_obj, _, batch = first_steps(clip, steps=1)
  convirt_obj = train.build(convirt)[1]
  rng = jax.random.PRNGKey(0)
  params = jax.device_get(clip_obj.init(rng, batch)[0])
  a, _ = clip_obj.loss(params, {}, batch, rng)
  b, _ = convirt_obj.loss(params, {}, batch, rng)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_siglip_starts_at_the_papers_scale_and_bias_and_is_not_clamped():
  config = load_config("siglip_shapes", "size=tiny")
  tokenizer, objective, _, optimizer = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  params, _ = objective.init(jax.random.PRNGKey(0), batch)
  np.testing.assert_allclose(params["logit_scale"], np.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(params["logit_bias"], -10.0)
  # No projection of the scale: a parameter above ln 100 stays where the update puts it.
  params = jax.tree.map(np.asarray, params)
  params["logit_scale"] = np.float32(6.0)
  updates, _ = optimizer.update(jax.tree.map(np.zeros_like, params), optimizer.init(params),
                                params)
  assert float(params["logit_scale"] + updates["logit_scale"]) == 6.0


def test_ring_or_global_view_is_chosen_from_the_logits_size():
  import jax
  import jax.numpy as jnp
  from conftest import tiny_config
  from contrastive_jax.objectives import base
  from jax.sharding import PartitionSpec as P
  mesh = parallel.make_mesh(8)

  def chosen(setting, block, rows_per_device):
    def f(x):
      return jnp.asarray(base.use_ring(setting, block, x.shape[0], "data"), jnp.int32)
    x = jnp.zeros((8 * rows_per_device, 1))
    return bool(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P())(x))

  # b · B = b² · 8 logits per device against the 2²² threshold: b = 724 is below, 725 above.
  assert not chosen("auto", None, 16) and not chosen("auto", None, 724)
  assert chosen("auto", None, 725) and chosen("auto", 4, 16)
  assert chosen("always", None, 16) and not chosen("never", 4, 1024)
  assert base.use_ring("auto", None, 2048, None) and not base.use_ring("auto", None, 2047, None)
  with pytest.raises(ValueError, match="config.loss.ring='sometimes'"):
    base.ring_setting(tiny_config(**{"loss.ring": "sometimes"}))

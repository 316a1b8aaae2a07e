"""Optimizer: decay mask, logit-scale projection after the update, schedule, clipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from contrastive_jax import optim


def _config(**kw):
  base = dict(learning_rate=1.0, warmup_steps=10, end_factor=0.0, b1=0.9, b2=0.98, eps=1e-6,
              weight_decay=0.1, grad_clip_norm=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_decay_mask_excludes_vectors_and_scalars():
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "ln": {"scale": jnp.ones(3)}, "logit_scale": jnp.zeros(()),
            "embed": {"embedding": jnp.ones((4, 2))}}
  mask = optim.decay_mask(params)
  assert mask["dense"]["kernel"] and mask["embed"]["embedding"]
  assert not mask["dense"]["bias"] and not mask["ln"]["scale"] and not mask["logit_scale"]


def test_weight_decay_touches_only_masked_leaves():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  tx = optim.make_optimizer(_config(warmup_steps=0), total_steps=10, logit_scale_max=None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["b"], 0.0)
  np.testing.assert_allclose(updates["w"], -0.1 * 1.0, rtol=1e-6)  # lr(0)=1 * wd * w


def test_logit_scale_projected_after_update_not_before():
  params = {"logit_scale": jnp.float32(4.6), "w": jnp.ones((2, 2))}
  tx = optim.make_optimizer(_config(warmup_steps=0, learning_rate=0.1), total_steps=100)
  grads = {"logit_scale": jnp.float32(-1.0), "w": jnp.zeros((2, 2))}  # pushes θ up
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["logit_scale"], math.log(100.0), rtol=1e-7)
  np.testing.assert_allclose(new["logit_scale"], 4.605170, atol=1e-6)
  # The gradient itself was not clipped: Adam's first moment saw the full -1.
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(mu["logit_scale"], -0.1, rtol=1e-6)


def test_schedule_warmup_and_cosine():
  sched = optim.learning_rate_schedule(_config(learning_rate=2.0, warmup_steps=10), 110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(sched(60), 1.0, rtol=1e-5)
  np.testing.assert_allclose(sched(110), 0.0, atol=1e-6)


def _train(tx, params, grads, steps):
  state = tx.init(params)
  history = []
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def test_frozen_leaves_do_not_move_then_train_without_stale_moments():
  params = {"prototypes": jnp.ones((3, 2)) / jnp.sqrt(2.0), "head": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optim.make_optimizer(_config(warmup_steps=0, learning_rate=0.1, name="sgd",
                                    momentum=0.9, freeze={"prototypes": 3}),
                            total_steps=100, logit_scale_max=None)
  history = _train(tx, params, grads, 5)
  for p in history[:3]:  # frozen: weight decay and momentum included
    np.testing.assert_array_equal(p["prototypes"], params["prototypes"])
  assert not np.allclose(history[0]["head"]["kernel"], params["head"]["kernel"])
  # Step 4 is the first update: SGD momentum starts from zero, so it moves by lr·(g + wd·p) only.
  expected = params["prototypes"] - 0.1 * (1.0 + 0.1 * params["prototypes"]) * (
      optim.learning_rate_schedule(_config(learning_rate=1.0, warmup_steps=0), 100)(3))
  np.testing.assert_allclose(history[3]["prototypes"], expected, rtol=1e-5)


def test_unit_norm_rows_keep_prototypes_on_the_sphere():
  params = {"prototypes": jnp.array([[0.6, 0.8], [1.0, 0.0]]), "w": jnp.ones((2, 2))}
  grads = {"prototypes": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "w": jnp.ones((2, 2))}
  tx = optim.make_optimizer(_config(warmup_steps=0, learning_rate=0.5, unit_norm=["prototypes"]),
                            total_steps=10, logit_scale_max=None)
  for p in _train(tx, params, grads, 3):
    np.testing.assert_allclose(np.linalg.norm(p["prototypes"], axis=-1), 1.0, rtol=1e-6)
    assert not np.allclose(np.linalg.norm(p["w"], axis=-1), 1.0)


def test_lars_and_unknown_optimizer():
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.ones(2)}
  tx = optim.make_optimizer(_config(warmup_steps=0, learning_rate=1.0, name="lars",
                                    weight_decay=0.0, momentum=0.0), 10, logit_scale_max=None)
  updates, _ = tx.update({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, tx.init(params), params)
  # LARS scales the kernel's step by trust · ||w|| / ||g|| = 1e-3 · 4 / 2; the bias is excluded.
  np.testing.assert_allclose(updates["w"], -1e-3 * 2.0, rtol=1e-5)
  np.testing.assert_allclose(updates["b"], -1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="config.optimizer.name='adam'"):
    optim.make_optimizer(_config(name="adam"), 10)

"""sinkhorn and swav_loss: closed forms, direct numpy references, 1/2/8-device parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from contrastive_jax import parallel
from contrastive_jax.losses import swav


_sinkhorn = jax.jit(swav.sinkhorn, static_argnums=(1, 2))
_swav = jax.jit(swav.swav_loss, static_argnames=("num_assign_crops", "temperature"))


def _scores(shape, seed=0):
  """Cosine-like scores in [-1, 1]."""
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def _numpy_sinkhorn(scores, eps, iters):
  """METHODS §1.6 as written (prototype-major Q, no log domain), in float64."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T  # K × N
  q /= q.sum()
  k, n = q.shape
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= n
  return (q * n).T


def _numpy_swav(scores, num_assign, tau, eps, iters):
  scores = np.asarray(scores, np.float64)
  v_crops, b, _ = scores.shape
  x = scores / tau
  log_p = x - x.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  total = 0.0
  for a in range(num_assign):
    q = _numpy_sinkhorn(scores[a], eps, iters)
    for v in range(v_crops):
      if v != a:
        total += -np.sum(q * log_p[v]) / b / (v_crops - 1)
  return total / num_assign


def _sharded_sinkhorn(scores, num_devices, **kwargs):
  mesh = parallel.make_mesh(num_devices)
  fn = jax.jit(jax.shard_map(lambda s: swav.sinkhorn(s, axis_name="data", **kwargs), mesh=mesh,
                             in_specs=P("data"), out_specs=P("data")))
  return fn(jax.device_put(scores, parallel.batch_sharding(mesh)))


def test_rows_sum_to_one_and_match_numpy():
  s = _scores((16, 6))
  for eps, iters in ((0.05, 3), (0.1, 1), (0.5, 10)):
    codes = _sinkhorn(s, eps, iters)
    assert codes.dtype == jnp.float32 and codes.shape == (16, 6)
    np.testing.assert_allclose(jnp.sum(codes, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(codes, _numpy_sinkhorn(s, eps, iters), rtol=1e-4, atol=1e-6)


def test_uniform_scores_give_uniform_codes():
  codes = _sinkhorn(jnp.full((8, 3000), 0.3), 0.05, 3)
  np.testing.assert_allclose(codes, 1 / 3000, rtol=1e-5)


def test_column_sums_approach_equipartition():
  s = _scores((16, 4), seed=1)
  target = 16 / 4
  err_3 = np.max(np.abs(np.sum(_sinkhorn(s, 0.05, 3), axis=0) - target))
  err_200 = np.max(np.abs(np.sum(_sinkhorn(s, 0.05, 200), axis=0) - target))
  assert err_3 > 0.1  # three iterations do not equipartition this batch yet ...
  assert err_200 < 1e-4  # ... but the fixed point does


def test_small_epsilon_gives_hard_equipartitioned_assignment():
  s = _scores((8, 4), seed=0)
  # The optimal assignment with each prototype taking exactly 8/4 = 2 samples.
  rows, cols = linear_sum_assignment(-np.repeat(np.asarray(s), 2, axis=1))
  hard = np.zeros((8, 4))
  hard[rows, cols // 2] = 1.0
  codes = _sinkhorn(s, 0.01, 1000)  # exp(100): overflows in float32 outside log domain
  assert np.all(np.isfinite(codes))
  np.testing.assert_allclose(codes, hard, atol=2e-2)
  # A plain per-row argmax is not equipartitioned here, so the test tells them apart.
  assert np.bincount(np.argmax(np.asarray(s), axis=1), minlength=4).max() > 2


@pytest.mark.parametrize("num_devices", [2, 8])
def test_sharded_sinkhorn_matches_single_device(num_devices):
  s = _scores((16, 10), seed=2)
  ref = _sinkhorn(s, 0.05, 3)
  codes = _sharded_sinkhorn(s, num_devices, epsilon=0.05, iterations=3)
  np.testing.assert_allclose(codes, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(codes, _numpy_sinkhorn(s, 0.05, 3), rtol=1e-4, atol=1e-6)
  # Normalising prototypes per device (no psum) would give something else.
  local = jnp.concatenate([_sinkhorn(c, 0.05, 3) for c in jnp.split(s, num_devices)])
  assert np.max(np.abs(local - _sinkhorn(s, 0.05, 3))) > 1e-2


def test_swav_uniform_scores_give_log_k():
  loss, metrics = _swav(jnp.zeros((4, 8, 3000)), num_assign_crops=2)
  np.testing.assert_allclose(loss, math.log(3000), rtol=1e-6)
  np.testing.assert_allclose(loss, 8.006368, rtol=1e-6)
  np.testing.assert_allclose(metrics["code_entropy"], math.log(3000), rtol=1e-5)
  np.testing.assert_allclose(metrics["code_max"], 1 / 3000, rtol=1e-5)


@pytest.mark.parametrize("num_assign", [1, 2, 4])
def test_swav_matches_numpy_reference(num_assign):
  s = _scores((4, 8, 5), seed=3)
  loss, metrics = _swav(s, num_assign_crops=num_assign, temperature=0.1)
  np.testing.assert_allclose(loss, _numpy_swav(s, num_assign, 0.1, 0.05, 3), rtol=1e-5)
  codes = np.stack([_numpy_sinkhorn(s[a], 0.05, 3) for a in range(num_assign)])
  ent = -np.sum(codes * np.log(codes), axis=-1).mean()
  np.testing.assert_allclose(metrics["code_entropy"], ent, rtol=1e-4)
  np.testing.assert_allclose(metrics["code_max"], codes.max(-1).mean(), rtol=1e-5)
  usage = np.bincount(codes.argmax(-1).reshape(-1), minlength=5) / codes[..., 0].size
  usage = usage[usage > 0]
  np.testing.assert_allclose(metrics["prototype_perplexity"],
                             np.exp(-np.sum(usage * np.log(usage))), rtol=1e-5)


def test_swav_gradient_treats_codes_as_constants():
  s = _scores((4, 8, 5), seed=4)
  num_assign, tau, v_crops, b = 2, 0.1, 4, 8
  grad = jax.jit(jax.grad(lambda x: swav.swav_loss(x, num_assign_crops=num_assign,
                                                    temperature=tau)[0]))(s)
  # Analytic: dL/dp_v = Σ_{a∈A, a≠v} (softmax(p_v/τ) − q_a) / (|A| (V−1) B τ).
  codes = [_numpy_sinkhorn(s[a], 0.05, 3) for a in range(num_assign)]
  p = np.asarray(jax.nn.softmax(s / tau, axis=-1), np.float64)
  ref = np.zeros(s.shape)
  for v in range(v_crops):
    for a in range(num_assign):
      if a != v:
        ref[v] += (p[v] - codes[a]) / (num_assign * (v_crops - 1) * b * tau)
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)
  # Differentiating through Sinkhorn would give a different gradient for the assignment crops.
  def through(x):
    log_p = jax.nn.log_softmax(x / tau, axis=-1)
    total = 0.0
    for a in range(num_assign):
      q = jax.nn.softmax(x[a] / 0.05, axis=-1)  # one-step codes, differentiable
      total += sum(-jnp.sum(q * log_p[v]) for v in range(v_crops) if v != a)
    return total
  assert np.max(np.abs(jax.jit(jax.grad(through))(s)[:num_assign])) > 1e-3


@pytest.mark.parametrize("num_devices", [2, 8])
def test_swav_sharded_matches_single_device_values_and_gradients(num_devices):
  s = _scores((4, 16, 12), seed=5)
  kwargs = {"num_assign_crops": 2, "temperature": 0.1}
  (ref, ref_metrics), ref_grad = jax.jit(jax.value_and_grad(
      lambda x: swav.swav_loss(x, **kwargs), has_aux=True))(s)
  mesh = parallel.make_mesh(num_devices)

  def local(x):
    return jax.value_and_grad(lambda x: swav.swav_loss(x, axis_name="data", **kwargs),
                              has_aux=True)(x)

  spec = P(None, "data")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=((P(), P()), spec)))
  (loss, metrics), grad = fn(jax.device_put(s, NamedSharding(mesh, spec)))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(loss, _numpy_swav(s, 2, 0.1, 0.05, 3), rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError):
    swav.swav_loss(jnp.zeros((1, 4, 3)), num_assign_crops=1)
  with pytest.raises(ValueError):
    swav.swav_loss(jnp.zeros((2, 4, 3)), num_assign_crops=3)
  with pytest.raises(ValueError):
    swav.sinkhorn(jnp.zeros((4, 3)), 0.05, 0)

"""siglip_loss: closed forms, a float64 reference, invariances and sharded parity of values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses.siglip import siglip_loss

INIT_SCALE = math.exp(math.log(10.0))  # t = exp(t'), t' initialised at ln 10
INIT_BIAS = -10.0


def _embeddings(b=16, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (b, d))
  y = x + 0.5 * jax.random.normal(k2, (b, d))
  return x, y


def _softplus(z):
  return math.log1p(math.exp(z))


def _orthogonal_modalities(b):
  """Every image along e_0, every text along e_1: all B² cosines are exactly 0."""
  x = jnp.zeros((b, 2)).at[:, 0].set(jnp.arange(1.0, b + 1))  # norms differ; normalised inside
  y = jnp.zeros((b, 2)).at[:, 1].set(3.0)
  return x, y


def test_init_closed_form_b4():
  # At init every logit is t·0 + b = −10. Each of the B positives costs −log σ(−10) =
  # softplus(10); each of the B(B−1) negatives costs −log σ(+10) = softplus(−10). Dividing
  # the sum by B: L = softplus(10) + (B−1)·softplus(−10) = 10.0000454 + 3·4.53989e-5.
  expected = _softplus(10.0) + 3 * _softplus(-10.0)
  assert abs(expected - 10.000182) < 5e-7
  x, y = _orthogonal_modalities(4)
  loss, metrics = siglip_loss(x, y, INIT_SCALE, INIT_BIAS)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 10.000182, rtol=1e-5)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_logit"], -10.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], -10.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_prob"], 1 / (1 + math.exp(10.0)), rtol=1e-5)


@pytest.mark.parametrize("b,expected", [(8, 10.000363), (1024, 10.046488)])
def test_init_closed_form_other_batch_sizes(b, expected):
  # Normalised by B (not B²): grows by softplus(−10) per extra pair partner.
  x, y = _orthogonal_modalities(b)
  loss, _ = siglip_loss(x, y, INIT_SCALE, INIT_BIAS)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(loss, _softplus(10.0) + (b - 1) * _softplus(-10.0), rtol=1e-6)


def test_init_bias_gradient_closed_form():
  # dL/db = (1/B) Σ_ij (σ(Z_ij) − [i=j]) = B·σ(−10) − 1 < 0: the bias grows first.
  b = 4
  x, y = _orthogonal_modalities(b)
  gb = jax.grad(lambda bias: siglip_loss(x, y, INIT_SCALE, bias)[0])(jnp.float32(INIT_BIAS))
  np.testing.assert_allclose(gb, b / (1 + math.exp(10.0)) - 1, rtol=1e-5)


def test_matches_float64_reference():
  x, y = _embeddings(b=6, d=5, seed=1)
  scale, bias = 3.0, -1.5
  xn = np.asarray(x, np.float64)
  yn = np.asarray(y, np.float64)
  xn /= np.linalg.norm(xn, axis=1, keepdims=True)
  yn /= np.linalg.norm(yn, axis=1, keepdims=True)
  total = 0.0
  for i in range(6):
    for j in range(6):
      z = scale * xn[i] @ yn[j] + bias
      label = 1.0 if i == j else -1.0
      total += math.log1p(math.exp(-label * z))  # −log σ(ℓ z)
  loss, metrics = siglip_loss(x, y, scale, bias)
  np.testing.assert_allclose(loss, total / 6, rtol=1e-5)
  logits = scale * xn @ yn.T + bias
  np.testing.assert_allclose(metrics["pos_logit"], np.mean(np.diag(logits)), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["neg_logit"], logits[~np.eye(6, dtype=bool)].mean(), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["pos_prob"], np.mean(1 / (1 + np.exp(-np.diag(logits)))), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["i2t_acc"], np.mean(logits.argmax(1) == np.arange(6)), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["t2i_acc"], np.mean(logits.argmax(0) == np.arange(6)), rtol=1e-6)


def test_accuracy_metrics_are_directional():
  # Both texts sit nearest image 0, so image->text retrieval is perfect and text->image is not:
  # image 1 = e_1 prefers text 1 (cos 0.11 > 0), but text 1 prefers image 0 (0.99 > 0.11).
  x = jnp.eye(2)
  y = jnp.array([[1.0, 0.0], [0.9, 0.1]])
  _, metrics = siglip_loss(x, y, 10.0, 0.0)
  assert metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 0.5
  _, metrics = siglip_loss(y, x, 10.0, 0.0)
  assert metrics["i2t_acc"] == 0.5 and metrics["t2i_acc"] == 1.0


def test_modality_swap_and_joint_permutation_invariance():
  x, y = _embeddings()
  perm = jax.random.permutation(jax.random.key(3), x.shape[0])
  ref, _ = siglip_loss(x, y, 10.0, -3.0)
  np.testing.assert_allclose(siglip_loss(y, x, 10.0, -3.0)[0], ref, rtol=1e-6)
  np.testing.assert_allclose(siglip_loss(x[perm], y[perm], 10.0, -3.0)[0], ref, rtol=1e-6)
  # Permuting one side only breaks the pairing, so the loss must change.
  assert abs(siglip_loss(x[perm], y, 10.0, -3.0)[0] - ref) > 1e-2


def test_bf16_inputs_give_float32_loss():
  x, y = _embeddings()
  ref, _ = siglip_loss(x, y, 10.0, -5.0)
  bf, _ = siglip_loss(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), 10.0, -5.0)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, ref, rtol=2e-2)
  np.testing.assert_allclose(siglip_loss(5 * x, 0.1 * y, 10.0, -5.0)[0], ref, rtol=1e-5)


@pytest.mark.parametrize("num_devices", [2, 8])
def test_sharded_value_and_gradient_match_single_device(num_devices):
  x, y = _embeddings(b=16, d=8)
  scale, bias = jnp.float32(7.0), jnp.float32(-4.0)

  def total(x, y, t, b):
    return siglip_loss(x, y, t, b)[0]

  ref_loss, ref_metrics = siglip_loss(x, y, scale, bias)
  ref_grads = jax.grad(total, argnums=(0, 1, 2, 3))(x, y, scale, bias)

  mesh = parallel.make_mesh(num_devices)

  def local(x, y, t, b):
    loss, metrics = siglip_loss(x, y, t, b, axis_name="data")
    grads = jax.grad(
        lambda *a: siglip_loss(*a, axis_name="data")[0], argnums=(0, 1, 2, 3))(x, y, t, b)
    return loss, metrics, grads

  fn = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
      out_specs=(P(), P(), (P("data"), P("data"), P(), P()))))
  sharding = parallel.batch_sharding(mesh)
  loss, metrics, grads = fn(
      jax.device_put(x, sharding), jax.device_put(y, sharding), scale, bias)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert np.max(np.abs(r)) > 1e-4  # every gradient is non-trivial
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

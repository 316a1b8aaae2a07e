"""dcl_loss (DCL / DCLW): closed forms, numpy references, weight identities, 1/2/8-device parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import dcl
from contrastive_jax.losses import simclr


def _views(b=16, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  z1 = jax.random.normal(k1, (b, d))
  z2 = z1 + 0.6 * jax.random.normal(k2, (b, d))
  return z1, z2


def _normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def _numpy_terms(z1, z2, tau, sigma=None):
  """Per-anchor DCL/DCLW and NT-Xent terms ``[2B]``, written independently on the full matrix."""
  h = np.concatenate([_normalize(z1), _normalize(z2)])
  n = h.shape[0]
  b = n // 2
  sim = h @ h.T
  pos_sim = np.array([sim[i, i + b] for i in range(b)])
  if sigma is None:
    w = np.ones(b)
  else:
    e = np.exp(pos_sim / sigma)
    w = 2.0 - e / e.mean()
  dcl_terms, nt_terms = np.zeros(n), np.zeros(n)
  for i in range(n):
    pos = (i + b) % n
    negs = [sim[i, k] / tau for k in range(n) if k not in (i, pos)]
    lse_neg = np.log(np.sum(np.exp(negs)))
    dcl_terms[i] = -w[i % b] * sim[i, pos] / tau + lse_neg
    nt_terms[i] = -sim[i, pos] / tau + np.logaddexp(lse_neg, sim[i, pos] / tau)
  return dcl_terms, nt_terms, w


def _equal_positive_views(b=8, d=8, cos=0.7, seed=3):
  """Views whose positive pairs all have cosine similarity ``cos``."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  z1 = _normalize(jax.random.normal(k1, (b, d)))
  r = np.asarray(jax.random.normal(k2, (b, d)), np.float64)
  u = _normalize(r - np.sum(r * z1, axis=1, keepdims=True) * z1)
  z2 = cos * z1 + math.sqrt(1 - cos**2) * u
  return jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)


def test_identical_embeddings_give_log_2b_minus_2():
  z = jnp.ones((4, 8))
  for tau in (0.1, 0.5, 1.0):
    loss, metrics = dcl.dcl_loss(z, z, tau)
    np.testing.assert_allclose(loss, math.log(6), rtol=1e-6)
    loss_w, _ = dcl.dcl_loss(z, z, tau, sigma=0.5)
    np.testing.assert_allclose(loss_w, math.log(6), rtol=1e-6)
  np.testing.assert_allclose(loss, 1.791759, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_logit"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_matches_numpy_reference(sigma):
  z1, z2 = _views()
  ref_terms, _, _ = _numpy_terms(z1, z2, 0.1, sigma)
  terms = dcl.dcl_anchor_losses(z1, z2, 0.1, sigma=sigma)[0]
  np.testing.assert_allclose(terms, ref_terms, rtol=1e-5, atol=1e-5)
  for flag in (True, False):
    loss, _ = dcl.dcl_loss(z1, z2, 0.1, sigma=sigma, stop_gradient_weights=flag)
    np.testing.assert_allclose(loss, ref_terms.mean(), rtol=1e-5)


def test_dcl_below_nt_xent_per_anchor():
  z1, z2 = _views(seed=4)
  for tau in (0.1, 0.5):
    dcl_terms, nt_terms, _ = _numpy_terms(z1, z2, tau)
    gap = nt_terms - dcl_terms  # = log(1 + exp(pos) / Σ exp(neg)) > 0
    assert np.all(gap > 0)
    terms = dcl.dcl_anchor_losses(z1, z2, tau)[0]
    np.testing.assert_allclose(terms, dcl_terms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(simclr.nt_xent_loss(z1, z2, tau)[0], nt_terms.mean(), rtol=1e-5)
    assert dcl.dcl_loss(z1, z2, tau)[0] < simclr.nt_xent_loss(z1, z2, tau)[0]


def test_dclw_equals_dcl_when_positive_similarities_are_equal():
  z1, z2 = _equal_positive_views()
  ref, _ = dcl.dcl_loss(z1, z2, 0.1)
  loss, metrics = dcl.dcl_loss(z1, z2, 0.1, sigma=0.5)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose([metrics["weight_min"], metrics["weight_max"]], 1.0, atol=1e-5)
  # Whereas unequal positives change the loss.
  z1, z2 = _views()
  assert abs(dcl.dcl_loss(z1, z2, 0.1, sigma=0.5)[0] - dcl.dcl_loss(z1, z2, 0.1)[0]) > 1e-3


def test_vmf_weights_sum_to_batch_and_match_formula():
  s = jax.random.uniform(jax.random.key(5), (16,), minval=-1.0, maxval=1.0)
  for sigma in (0.1, 0.5, 2.0):
    w = dcl.vmf_weights(s, sigma)
    np.testing.assert_allclose(jnp.sum(w), 16.0, rtol=1e-5)
    e = np.exp(np.asarray(s, np.float64) / sigma)
    np.testing.assert_allclose(w, 2.0 - e / e.mean(), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(w) < 2.0)
    # Larger positive similarity (an easier positive) ⇒ smaller weight.
    order = np.argsort(np.asarray(s))
    assert np.all(np.diff(np.asarray(w)[order]) <= 1e-6)


def test_stop_gradient_flag():
  z1, z2 = _views()
  grads = {}
  for flag in (True, False):
    fn = lambda a, b, flag=flag: dcl.dcl_loss(a, b, 0.1, sigma=0.5,
                                              stop_gradient_weights=flag)[0]
    grads[flag] = jax.grad(fn, argnums=(0, 1))(z1, z2)
  diff = max(float(jnp.max(jnp.abs(g - h))) for g, h in zip(grads[True], grads[False]))
  assert diff > 1e-3

  # With sg, the gradient is that of the loss with the weights frozen as constants.
  _, _, w = _numpy_terms(z1, z2, 0.1, sigma=0.5)
  w2 = jnp.asarray(np.concatenate([w, w]), jnp.float32)

  def frozen(a, b):
    logits, pos, neg_mask = dcl.dcl_logits(a, b, 0.1)
    lse = jax.nn.logsumexp(jnp.where(neg_mask, logits, -1e9), axis=1)
    return jnp.mean(lse - w2 * pos)

  ref = jax.grad(frozen, argnums=(0, 1))(z1, z2)
  for g, r in zip(grads[True], ref):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def _sharded(z1, z2, kwargs, num_devices):
  mesh = parallel.make_mesh(num_devices)

  def local(z1, z2):
    fn = lambda z1, z2: dcl.dcl_loss(z1, z2, 0.1, axis_name="data", **kwargs)
    (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(z1, z2)
    return loss, metrics, grads

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                             out_specs=(P(), P(), (P("data"), P("data")))))
  sharding = parallel.batch_sharding(mesh)
  return fn(jax.device_put(z1, sharding), jax.device_put(z2, sharding))


@pytest.mark.parametrize("num_devices", [2, 8])
@pytest.mark.parametrize("kwargs", [
    {}, {"sigma": 0.5}, {"sigma": 0.5, "stop_gradient_weights": False}],
    ids=["dcl", "dclw_sg", "dclw_grad"])
def test_sharded_matches_single_device_values_and_gradients(num_devices, kwargs):
  z1, z2 = _views()
  (ref, ref_metrics), ref_grads = jax.value_and_grad(
      lambda a, b: dcl.dcl_loss(a, b, 0.1, **kwargs), argnums=(0, 1), has_aux=True)(z1, z2)
  loss, metrics, grads = _sharded(z1, z2, kwargs, num_devices)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  ref_terms, _, _ = _numpy_terms(z1, z2, 0.1, kwargs.get("sigma"))
  np.testing.assert_allclose(loss, ref_terms.mean(), rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_local_weight_normalisation_would_be_caught():
  # lightly normalises the DCLW weights per device; that value differs from the global one,
  # which the 8-device loss reproduces.
  z1, z2 = _views()
  b_local = 2
  h1, h2 = _normalize(z1), _normalize(z2)
  pos_sim = np.sum(h1 * h2, axis=1)
  e = np.exp(pos_sim / 0.5).reshape(-1, b_local)
  w_local = (2.0 - e / e.mean(axis=1, keepdims=True)).reshape(-1)
  _, _, w_global = _numpy_terms(z1, z2, 0.1, sigma=0.5)
  assert np.max(np.abs(w_local - w_global)) > 1e-2
  mesh = parallel.make_mesh(8)
  fn = jax.jit(jax.shard_map(lambda s: dcl.vmf_weights(s, 0.5, axis_name="data"), mesh=mesh,
                             in_specs=P("data"), out_specs=P("data")))
  w = fn(jax.device_put(jnp.asarray(pos_sim, jnp.float32), parallel.batch_sharding(mesh)))
  np.testing.assert_allclose(w, w_global, rtol=1e-5, atol=1e-5)

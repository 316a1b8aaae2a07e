"""Hard contrastive loss (Wang & Liu): quantile 0 == NT-Xent, the one-hardest-negative closed
form, a numpy reference, and 8-device value+gradient parity."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses, parallel
from contrastive_jax.losses.hard_info_nce import hard_info_nce_loss, num_hard_negatives

_grad = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _views(b=8, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  z1 = jax.random.normal(k1, (b, d))
  return z1, z1 + 0.8 * jax.random.normal(k2, (b, d))


def _np_reference(z1, z2, tau, k):
  h = np.concatenate([z1, z2]).astype(np.float64)
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  n = len(h)
  sim = h @ h.T
  total = 0.0
  for i in range(n):
    pos = (i + n // 2) % n
    negs = np.sort([sim[i, j] for j in range(n) if j not in (i, pos)])[::-1][:k]
    total += -sim[i, pos] / tau + np.log(np.exp(sim[i, pos] / tau) + np.exp(negs / tau).sum())
  return total / n


def test_num_hard_negatives():
  assert num_hard_negatives(8, 0.0) == 14
  assert num_hard_negatives(8, 0.5) == 7
  assert num_hard_negatives(8, 0.99) == 1
  with pytest.raises(ValueError):
    num_hard_negatives(8, 1.0)


def test_quantile_zero_is_nt_xent_value_and_gradients():
  z1, z2 = _views()
  (loss, metrics), grads = _grad(lambda a, b: hard_info_nce_loss(a, b, 0.2))(z1, z2)
  (ref, ref_metrics), ref_grads = _grad(lambda a, b: losses.nt_xent_loss(a, b, 0.2))(z1, z2)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(metrics["acc"], ref_metrics["acc"])
  np.testing.assert_allclose(metrics["kept_fraction"], 1.0)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_matches_reference_and_hardest_negative_closed_form():
  z1, z2 = _views()
  fn = jax.jit(hard_info_nce_loss, static_argnames=("temperature", "quantile"))
  for q, k in ((0.5, 7), (0.99, 1)):
    loss, metrics = fn(z1, z2, temperature=0.5, quantile=q)
    np.testing.assert_allclose(loss, _np_reference(np.asarray(z1), np.asarray(z2), 0.5, k),
                               rtol=1e-5)
  np.testing.assert_allclose(metrics["kept_fraction"], 1 / 14, rtol=1e-6)
  # Dropping easy negatives only lowers the denominator; τ → 0 with one negative:
  # ℓ_i → max(0, s_in − s_ip)/τ.
  assert fn(z1, z2, temperature=0.5, quantile=0.5)[0] < fn(z1, z2, temperature=0.5)[0]
  tau = 1e-3
  h = np.concatenate([np.asarray(z1), np.asarray(z2)]).astype(np.float64)
  h /= np.linalg.norm(h, axis=1, keepdims=True)
  sim, n = h @ h.T, len(h)
  hinge = np.mean([max(0.0, max(sim[i, j] for j in range(n) if j not in (i, (i + n // 2) % n))
                       - sim[i, (i + n // 2) % n]) for i in range(n)]) / tau
  np.testing.assert_allclose(fn(z1, z2, temperature=tau, quantile=0.99)[0], hinge,
                             rtol=1e-3, atol=math.log(2.0) + 1e-3)


def test_eight_devices_match_single_device():
  z1, z2 = _views(b=16)
  fn = lambda a, b, axis_name=None: hard_info_nce_loss(a, b, 0.5, quantile=0.7,
                                                       axis_name=axis_name)
  (ref, ref_metrics), ref_grads = _grad(fn)(z1, z2)
  mesh = parallel.make_mesh(8)
  local = lambda a, b: jax.value_and_grad(lambda a, b: fn(a, b, "data"), argnums=(0, 1),
                                          has_aux=True)(a, b)
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=((P(), P()), (P("data"), P("data")))))
  put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))
  (loss, metrics), grads = sharded(put(z1), put(z2))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)

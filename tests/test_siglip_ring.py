"""Memory-lean ring SigLIP loss == global-view siglip_loss (values, metrics, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss

ARGNUMS = (0, 1, 2, 3)


def _inputs(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (32, 8))
  y = x + 0.7 * jax.random.normal(k2, (32, 8))
  return x.astype(dtype), y.astype(dtype), jnp.float32(10.0), jnp.float32(-3.0)


def _reference(*args):
  return jax.value_and_grad(lambda *a: siglip_loss(*a), argnums=ARGNUMS, has_aux=True)(*args)


def _sharded(args, num_devices, block_size):
  mesh = parallel.make_mesh(num_devices)

  def local(*a):
    fn = lambda *a: ring_siglip_loss(*a, block_size=block_size, axis_name="data")
    return jax.value_and_grad(fn, argnums=ARGNUMS, has_aux=True)(*a)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                             out_specs=((P(), P()), (P("data"), P("data"), P(), P()))))
  sharding = parallel.batch_sharding(mesh)
  x, y, s, b = args
  return fn(jax.device_put(x, sharding), jax.device_put(y, sharding), s, b)


def _assert_match(got, want, rtol=1e-5, atol=1e-6):
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = want
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=atol, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("block_size", [None, 4])
def test_single_device_matches_reference(block_size):
  args = _inputs()
  got = jax.value_and_grad(lambda *a: ring_siglip_loss(*a, block_size=block_size),
                           argnums=ARGNUMS, has_aux=True)(*args)
  _assert_match(got, _reference(*args))


@pytest.mark.parametrize("num_devices,block_size", [(2, None), (2, 8), (8, 1), (8, 2)])
def test_ring_matches_reference_on_devices(num_devices, block_size):
  args = _inputs()
  _assert_match(_sharded(args, num_devices, block_size), _reference(*args))


def test_closed_form_at_init_through_the_ring():
  """All cosines 0 at t=10, b=-10: softplus(10) + (B-1) softplus(-10); B=8 -> 10.000363."""
  x = jnp.eye(8, 16)
  y = jnp.eye(8, 16, k=8)  # orthogonal to every x
  (loss, _), _ = _sharded((x, y, jnp.float32(10.0), jnp.float32(-10.0)), 8, None)
  np.testing.assert_allclose(loss, 10.000363, rtol=1e-6)


def test_bfloat16_inputs():
  args = _inputs(jnp.bfloat16)
  (loss, _), grads = _sharded(args, 8, 2)
  assert loss.dtype == jnp.float32
  f32 = (args[0].astype(jnp.float32), args[1].astype(jnp.float32), *args[2:])
  (ref_loss, _), ref_grads = _reference(*f32)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grads[0].astype(jnp.float32), ref_grads[0], rtol=2e-2, atol=1e-3)


def test_one_device_memory_holds_no_batch_by_dim_temporary():
  """Blocks are scored on the raw rows with per-row factors: on one device value_and_grad
  keeps no [B, D] temporary (about four with normalised copies as residuals)."""
  from contrastive_jax.losses import memory_profile
  fn = lambda x, y, s, axis: ring_siglip_loss(x, y, s, -10.0, block_size=64, axis_name=axis)
  b, d = 65_536, 512
  one = memory_profile.temp_bytes(fn, b, d, 1)
  wider = memory_profile.temp_bytes(fn, b, 2 * d, 1)
  bd = b * d * 4
  assert one < 0.5 * bd, one / bd
  assert wider - one < 0.05 * bd, (wider - one) / bd


def test_zero_rows_match_reference_and_stay_finite():
  x, y, s, b = _inputs()
  x = x.at[3].set(0.0)
  y = y.at[3].set(0.0).at[17].set(0.0)
  want = _reference(x, y, s, b)
  got = _sharded((x, y, s, b), 8, 2)
  assert all(bool(jnp.isfinite(g).all()) for g in got[1])
  scale = max(float(jnp.abs(g).max()) for g in want[1][:2])
  _assert_match(got, want, atol=1e-6 * scale)

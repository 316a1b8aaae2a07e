"""Ring NT-Xent / DCL / DCLW == the global-view nt_xent_loss / dcl_loss (values, metrics,
gradients) on 1, 2 and 8 devices and under pmap; their compiled memory grows linearly."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import dcl, memory_profile, simclr
from contrastive_jax.losses.simclr_ring import ring_dcl_loss, ring_nt_xent_loss

TAU = 0.1
# name -> (global-view reference, ring form, keyword arguments of both)
KINDS = {
    "nt_xent": (simclr.nt_xent_loss, ring_nt_xent_loss, {}),
    "dcl": (dcl.dcl_loss, ring_dcl_loss, {}),
    "dclw_sg": (dcl.dcl_loss, ring_dcl_loss, {"sigma": 0.5}),
    "dclw_grad": (dcl.dcl_loss, ring_dcl_loss, {"sigma": 0.5, "stop_gradient_weights": False}),
}


def _views(b=48, d=8, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  z1 = jax.random.normal(k1, (b, d))
  z2 = z1 + 0.6 * jax.random.normal(k2, (b, d))
  return z1.astype(dtype), z2.astype(dtype)


@functools.lru_cache(maxsize=None)
def _reference_of_views(kind, dtype):
  return _reference(kind, *_views(dtype=dtype))


def _reference(kind, z1, z2):
  ref_fn, _, kwargs = KINDS[kind]
  fn = lambda a, b: ref_fn(a, b, TAU, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(z1, z2)


def _ring(kind, z1, z2, num_devices, block_size):
  """``((loss, metrics), grads)`` of the ring form; ``num_devices`` None: no mapped axis."""
  _, ring_fn, kwargs = KINDS[kind]
  axis = None if num_devices is None else "data"
  fn = lambda a, b: ring_fn(a, b, TAU, block_size=block_size, axis_name=axis, **kwargs)
  grad = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)
  if num_devices is None:
    return jax.jit(grad)(z1, z2)
  mesh = parallel.make_mesh(num_devices)
  mapped = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P("data"), P("data")),
                                 out_specs=((P(), P()), (P("data"), P("data")))))
  sharding = parallel.batch_sharding(mesh)
  return mapped(jax.device_put(z1, sharding), jax.device_put(z2, sharding))


def _assert_match(got, want, rtol=1e-5, atol=1e-6):
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = want
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  assert set(metrics) == set(ref_metrics)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=atol, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind,block_size", [("nt_xent", 3), ("dclw_grad", None)])
def test_single_device_matches_reference(kind, block_size):
  z1, z2 = _views()
  _assert_match(_ring(kind, z1, z2, None, block_size), _reference_of_views(kind, jnp.float32))


# Local batch b = 48 / W; the 2b local anchors go in row blocks of block_size: odd blocks (3),
# blocks that straddle the two views (4 of b = 6: rows 4..7 hold anchors of both views).
@pytest.mark.parametrize("kind,num_devices,block_size", [
    ("nt_xent", 2, 3), ("nt_xent", 8, 4), ("dcl", 8, 3), ("dclw_sg", 8, 2),
    ("dclw_grad", 2, None), ("dclw_grad", 8, 4)])
def test_ring_matches_reference_on_devices(kind, num_devices, block_size):
  z1, z2 = _views()
  got = _ring(kind, z1, z2, num_devices, block_size)
  _assert_match(got, _reference_of_views(kind, jnp.float32))
  assert 0.0 < float(got[0][1]["acc"]) < 1.0  # the accuracy metric is not trivially 0 or 1


@pytest.mark.parametrize("kind", ["dclw_grad"])
def test_ring_under_pmap_matches_reference(kind):
  z1, z2 = _views()
  (ref_loss, _), ref_grads = _reference_of_views(kind, jnp.float32)
  _, ring_fn, kwargs = KINDS[kind]

  def local(a, b):
    fn = lambda a, b: ring_fn(a, b, TAU, block_size=3, axis_name="data", **kwargs)[0]
    loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(a, b)
    # pmap's psum transposes to a psum: each device holds W × its share (see parallel.py).
    return loss, jax.tree.map(lambda g: g / jax.lax.psum(1, "data"), grads)

  loss, grads = jax.pmap(local, axis_name="data")(z1.reshape(8, 6, 8), z2.reshape(8, 6, 8))
  np.testing.assert_allclose(loss, np.full(8, ref_loss), rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.reshape(48, 8), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dclw_sg"])
def test_bfloat16_inputs(kind):
  z1, z2 = _views(dtype=jnp.bfloat16)
  (loss, metrics), grads = _ring(kind, z1, z2, 8, 2)
  assert loss.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
  (ref_loss, ref_metrics), ref_grads = _reference(kind, z1, z2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)  # normalised in float32 either way
  np.testing.assert_allclose(metrics["acc"], ref_metrics["acc"])
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), rtol=2e-2,
                               atol=2e-3)


def test_identical_embeddings_closed_forms():
  # METHODS.md §1.7 / §1.8: every anchor's term is ln(2B − 1) (NT-Xent) and ln(2B − 2) (DCL).
  z = jnp.ones((48, 8))
  (nt, _), _ = _ring("nt_xent", z, z, 8, 3)
  (dc, _), _ = _ring("dcl", z, z, 8, 3)
  np.testing.assert_allclose(nt, math.log(2 * 48 - 1), rtol=1e-5)
  np.testing.assert_allclose(dc, math.log(2 * 48 - 2), rtol=1e-5)


@pytest.mark.parametrize("kind,num_devices,block_size", [("nt_xent", 2, 4), ("dcl", 8, None)])
def test_exact_ties_score_like_a_dense_argmax(kind, num_devices, block_size):
  # Identical views repeated every 6 rows: each anchor ties exactly with its positive and the
  # copies of both. A dense argmax picks the lowest global column, so NT-Xent hits only for the
  # view-2 anchors of the first 6 rows (6 of 96), whatever order the ring visits the shards
  # in; DCL's strict "positive beats every negative" never holds.
  z, _ = _views()
  z = jnp.concatenate([z[:6]] * 8)
  got = _ring(kind, z, z, num_devices, block_size)
  want = _reference(kind, z, z)
  _assert_match(got, want)
  assert float(want[0][1]["acc"]) == (6 / 96 if kind == "nt_xent" else 0.0)


def test_compiled_memory_grows_linearly_in_batch():
  # DCL shares the ring; tests/test_clip_ring.py checks the slopes of every memory_profile.LOSSES.
  (b1, ref1, lean1), (b2, ref2, lean2) = memory_profile.memory_table(
      "nt_xent", [1024, 2048], dim=64, num_devices=8, block_size=32)
  assert b2 == 2 * b1
  assert lean2 / lean1 < 2.2, (lean1, lean2)
  assert ref2 / ref1 > 3.0, (ref1, ref2)  # the global view's [2b, 2B] logits: ~4×
  # The ring's whole temp is under a quarter of one device's [2b, 2B] float32 logits.
  logits_bytes = (2 * b2 // 8) * (2 * b2) * 4  # 8 MiB at B = 2048
  assert lean2 < logits_bytes / 4, (lean2, logits_bytes)

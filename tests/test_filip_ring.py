"""Memory-lean ring FILIP loss == global-view filip_loss (values, metrics, gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import memory_profile
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.filip_ring import ring_filip_loss

SCALE = 10.0
RNG = jax.random.key(5)
EMPTY_TEXT = 3  # a sample whose text is fully masked
EMPTY_IMAGE = 8  # a fully masked image: first row of a device on 2 and on 8 devices


def _tokens(b=16, t_img=4, t_txt=5, d=8, seed=0, dtype=jnp.float32):
  """Paired token tensors with uneven random masks, one empty text and one empty image.

  Built with numpy: eager jax ops would each compile once and dominate the test time.
  """
  gen = np.random.default_rng(seed)
  image = gen.normal(size=(b, t_img, d)).astype(np.float32)
  text = (image[:, :1] + 0.7 * gen.normal(size=(b, t_txt, d))).astype(np.float32)
  text_len = gen.integers(1, t_txt + 1, size=b)
  image_len = gen.integers(1, t_img + 1, size=b)
  text_mask = np.arange(t_txt)[None, :] < text_len[:, None]
  image_mask = np.arange(t_img)[None, :] < image_len[:, None]
  assert len(set(text_len.tolist())) > 2 and not np.all(image_mask)
  text_mask[EMPTY_TEXT] = False
  image_mask[EMPTY_IMAGE] = False
  return (jnp.asarray(image, dtype), jnp.asarray(text, dtype), jnp.asarray(text_mask),
          jnp.asarray(image_mask))


def _grad_fn(loss_fn, **kwargs):
  """``(x, y, tm, im, s) -> ((loss, metrics), (gx, gy, gs))``."""
  def fn(x, y, tm, im, s):
    return jax.value_and_grad(
        lambda x, y, s: loss_fn(x, y, tm, s, image_mask=im, rng=RNG, **kwargs),
        argnums=(0, 1, 2), has_aux=True)(x, y, s)
  return fn


@functools.lru_cache(maxsize=None)
def _reference_fn(keep):
  return jax.jit(_grad_fn(filip_loss, keep_image_tokens=keep))


@functools.lru_cache(maxsize=None)
def _ring_fn(num_devices, block_size, keep):
  """Jitted value_and_grad of the ring loss, on one device (no axis) or under shard_map."""
  if num_devices == 1:
    return jax.jit(_grad_fn(ring_filip_loss, block_size=block_size, keep_image_tokens=keep))
  mesh = parallel.make_mesh(num_devices)
  local = _grad_fn(ring_filip_loss, block_size=block_size, keep_image_tokens=keep,
                   axis_name="data")
  data = P("data")
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(data, data, data, data, P()),
                             out_specs=((P(), P()), (data, data, P()))))
  put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))
  return lambda x, y, tm, im, s: fn(put(x), put(y), put(tm), put(im), s)


def _assert_match(got, want, rtol=1e-5, atol=1e-6, grad_rtol=1e-5, grad_atol=1e-6):
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = want
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  assert set(metrics) == set(ref_metrics)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=atol, err_msg=k)
  for name, g, r in zip("xys", grads, ref_grads):
    assert np.max(np.abs(np.asarray(r, np.float32))) > 1e-4, name  # a real gradient
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=grad_rtol, atol=grad_atol, err_msg=name)


def _check_empty_samples(result):
  (loss, _), (gx, gy, gs) = result
  assert np.isfinite(loss) and np.isfinite(gs)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  np.testing.assert_array_equal(gy[EMPTY_TEXT], 0.0)
  np.testing.assert_array_equal(gx[EMPTY_IMAGE], 0.0)


@pytest.mark.parametrize("block_size", [None, 3])
def test_single_device_matches_reference(block_size):
  # block 3 does not divide b = 16: one block, as ring.row_blocks does.
  data = _tokens() + (jnp.float32(SCALE),)
  got = _ring_fn(1, block_size, None)(*data)
  _assert_match(got, _reference_fn(None)(*data))
  _check_empty_samples(got)


@pytest.mark.parametrize("num_devices,block_size", [(2, 4), (8, 1), (8, None)])
def test_ring_matches_reference_on_devices(num_devices, block_size):
  data = _tokens(seed=1) + (jnp.float32(SCALE),)
  want = _reference_fn(None)(*data)
  # The empty image scores 0 against every text: its row is an exact tie that the global
  # view resolves to text 0 (a miss), so the ring must break ties by the lowest index too.
  assert want[0][1]["i2t_acc"] < 1.0
  got = _ring_fn(num_devices, block_size, None)(*data)
  _assert_match(got, want)
  _check_empty_samples(got)


def test_token_reduction_matches_reference():
  # Sharded ring with reduction == single-device global view with the same rng.
  data = _tokens(seed=2) + (jnp.float32(SCALE),)
  want = _reference_fn(0.5)(*data)
  got = _ring_fn(8, 2, 0.5)(*data)
  _assert_match(got, want)
  kept = np.abs(np.asarray(got[1][0])).sum(-1) > 0  # [B, T_img]: tokens that took part
  assert kept.sum(1).max() == 2  # round(0.5 · 4) tokens per image
  # Without reduction the loss differs: the reduction really happened.
  assert abs(float(_reference_fn(None)(*data)[0][0]) - float(want[0][0])) > 1e-4


def test_bfloat16_inputs():
  image, text, text_mask, image_mask = _tokens(seed=3, dtype=jnp.bfloat16)
  s = jnp.float32(SCALE)
  got = _ring_fn(8, None, None)(image, text, text_mask, image_mask, s)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  # Tokens are normalised in float32 either way, so value and metrics equal the float32
  # reference on the same (bfloat16-representable) values; the gradients are bfloat16.
  want = _reference_fn(None)(image.astype(jnp.float32), text.astype(jnp.float32), text_mask,
                             image_mask, s)
  _assert_match(got, want, grad_rtol=2e-2, grad_atol=1e-3)


def test_ring_under_pmap_matches_reference():
  image, text, text_mask, image_mask = _tokens(seed=4)
  s = jnp.float32(SCALE)
  (ref_loss, _), ref_grads = _reference_fn(None)(image, text, text_mask, image_mask, s)

  def local(x, y, tm, im):
    fn = lambda x: ring_filip_loss(x, y, tm, s, image_mask=im, block_size=1,
                                   axis_name="data")[0]
    loss, gx = jax.value_and_grad(fn)(x)
    return loss, gx / jax.lax.psum(1, "data")  # pmap's psum transpose; see parallel.py

  split = lambda a: a.reshape(8, 2, *a.shape[1:])
  loss, gx = jax.pmap(local, axis_name="data")(
      split(image), split(text), split(text_mask), split(image_mask))
  np.testing.assert_allclose(loss, np.full(8, ref_loss), rtol=1e-5)
  np.testing.assert_allclose(gx.reshape(image.shape), ref_grads[0], rtol=1e-5, atol=1e-6)


def test_memory_grows_linearly_in_batch():
  rows = memory_profile.memory_table("filip", [128, 256, 512], dim=64, num_devices=8,
                                     block_size=8, image_tokens=4, text_tokens=4)
  reference_slope, ring_slope = memory_profile.loglog_slopes(rows)
  assert ring_slope <= 1.05, rows
  assert reference_slope >= 1.4, rows
  assert all(lean < ref for _, ref, lean in rows)

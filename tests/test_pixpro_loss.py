"""PixPro geometry, pixel propagation and loss: closed forms, mirror symmetry, 8-device parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses.pixpro import (bin_centers, pixel_propagation, pixpro_loss,
                                           positive_pixel_mask)

H, W, C = 4, 4, 8


# One compilation per test instead of op-by-op dispatch.
pixpro_loss = jax.jit(pixpro_loss, static_argnames=("threshold", "axis_name"))
positive_pixel_mask = jax.jit(positive_pixel_mask, static_argnums=(2, 3, 4))
bin_centers = jax.jit(bin_centers, static_argnums=(1, 2))
pixel_propagation = jax.jit(pixel_propagation, static_argnums=(2,))


def _maps(b, key=0, h=H, w=W):
  return np.random.default_rng(key).standard_normal((b, h, w, C)).astype(np.float32)


def _boxes(b, key=1):
  """Random overlapping crops (x0 < x1 except every third view, which is flipped)."""
  rng = np.random.default_rng(key)
  lo = rng.uniform(0.0, 0.4, (b, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.4, 0.6, (b, 2))], axis=1)
  flip = (np.arange(b) % 3 == 0)[:, None]
  return np.where(flip, boxes[:, [2, 1, 0, 3]], boxes).astype(np.float32)


def test_bin_centers_closed_form():
  boxes = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.4, 0.6, 0.6]])
  c = bin_centers(boxes, 2, 2)
  want0 = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # row-major (v, u)
  want1 = [[0.3, 0.45], [0.5, 0.45], [0.3, 0.55], [0.5, 0.55]]
  np.testing.assert_allclose(c, [want0, want1], rtol=1e-6)
  flipped = bin_centers(boxes[:, [2, 1, 0, 3]], 2, 2)
  np.testing.assert_allclose(flipped[:, [1, 0, 3, 2]], c, rtol=1e-6)  # columns reversed


def test_identical_boxes_give_the_diagonal():
  boxes = _boxes(3)
  mask = positive_pixel_mask(boxes, boxes, H, W)
  assert mask.shape == (3, H * W, H * W) and mask.dtype == jnp.bool_
  assert np.all(np.diagonal(np.asarray(mask), axis1=1, axis2=2))
  # Square bins: the nearest other bin is one side away, 1/√2 ≈ 0.707 diagonals > 0.7.
  square = jnp.array([[0.1, 0.1, 0.5, 0.5]])
  np.testing.assert_array_equal(positive_pixel_mask(square, square, H, W)[0],
                                np.eye(H * W, dtype=bool))
  assert positive_pixel_mask(square, square, H, W, threshold=0.71)[0].sum() > H * W


def test_mask_swaps_to_transpose_and_mirrors_under_flip():
  b1 = jnp.array([[0.1, 0.2, 0.7, 0.9]])
  b2 = jnp.array([[0.3, 0.1, 0.9, 0.8]])
  mask = np.asarray(positive_pixel_mask(b1, b2, H, W))
  assert 0 < mask.sum() < mask.size
  np.testing.assert_array_equal(positive_pixel_mask(b2, b1, H, W), mask.transpose(0, 2, 1))
  flipped = np.asarray(positive_pixel_mask(b1, b2[:, [2, 1, 0, 3]], H, W))
  mirrored = mask.reshape(1, H * W, H, W)[..., ::-1].reshape(mask.shape)
  np.testing.assert_array_equal(flipped, mirrored)
  assert not np.array_equal(flipped, mask)


def test_disjoint_boxes_give_empty_mask_and_zero_loss():
  b1 = jnp.array([[0.0, 0.0, 0.3, 0.3]] * 2)
  b2 = jnp.array([[0.7, 0.7, 1.0, 1.0]] * 2)
  assert not positive_pixel_mask(b1, b2, H, W).any()
  y1, y2, k1, k2 = (_maps(2, key=i) for i in range(4))
  loss, metrics = pixpro_loss(y1, y2, k1, k2, b1, b2)
  assert float(loss) == 0.0
  assert float(metrics["pos_fraction"]) == 0.0 and float(metrics["empty_fraction"]) == 1.0
  grads = jax.jit(jax.grad(lambda y: pixpro_loss(y, y2, k1, k2, b1, b2)[0]))(y1)
  assert np.all(np.isfinite(grads)) and not np.any(grads)


def test_perfect_agreement_gives_minus_four():
  b = 4
  square = np.array([[0.1, 0.1, 0.5, 0.5]] * b, np.float32)  # mask = identity
  f1, f2 = _maps(b, key=3), _maps(b, key=4)
  # View-1 pixel i is positive with view-2 pixel i, so k2 must equal y1 there.
  loss, metrics = pixpro_loss(f1, f2, f2, f1, square, square)
  np.testing.assert_allclose(loss, -4.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["pos_cos"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["pos_fraction"], 1.0 / (H * W), rtol=1e-6)
  # Scale invariance (per-pixel normalisation) and a generic mask with per-image constant
  # features: every positive pair has cosine 1.
  boxes1, boxes2 = _boxes(b, key=5), _boxes(b, key=6)
  const = np.broadcast_to(_maps(b, key=7, h=1, w=1), (b, H, W, C))
  assert positive_pixel_mask(boxes1, boxes2, H, W).any(axis=(1, 2)).all()
  loss, _ = pixpro_loss(3.0 * const, const, const, 0.5 * const, boxes1, boxes2)
  np.testing.assert_allclose(loss, -4.0, rtol=1e-5)
  # Opposite features: +4.
  loss, _ = pixpro_loss(f1, f2, -f2, -f1, square, square)
  np.testing.assert_allclose(loss, 4.0, rtol=1e-5)


def _numpy_reference_loss(y1, y2, k1, k2, boxes1, boxes2, threshold=0.7):
  y1, y2, k1, k2, boxes1, boxes2 = (np.asarray(t, np.float64)
                                    for t in (y1, y2, k1, k2, boxes1, boxes2))
  b, h, w, c = y1.shape

  def centres(box):
    us, vs = np.meshgrid(np.arange(w), np.arange(h))  # [h, w] column / row index
    x = box[0] + (us + 0.5) * (box[2] - box[0]) / w
    y = box[1] + (vs + 0.5) * (box[3] - box[1]) / h
    return np.stack([x.ravel(), y.ravel()], -1)

  def diag(box):
    return np.hypot((box[2] - box[0]) / w, (box[3] - box[1]) / h)

  def reg(y, k, ba, bb):
    total = 0.0
    for n in range(b):
      d = np.linalg.norm(centres(ba[n])[:, None] - centres(bb[n])[None], axis=-1)
      mask = d / max(diag(ba[n]), diag(bb[n])) < threshold
      yn = y[n].reshape(-1, c)
      kn = k[n].reshape(-1, c)
      yn = yn / np.linalg.norm(yn, axis=-1, keepdims=True)
      kn = kn / np.linalg.norm(kn, axis=-1, keepdims=True)
      total += (mask * (yn @ kn.T)).sum() / (mask.sum() + 1e-6)
    return -total / b

  return 2 * reg(y1, k2, boxes1, boxes2) + 2 * reg(y2, k1, boxes2, boxes1)


def test_loss_matches_numpy_reference():
  b = 6
  y1, y2, k1, k2 = (_maps(b, key=i) for i in range(4))
  boxes1, boxes2 = _boxes(b, key=5), _boxes(b, key=6)
  loss, _ = pixpro_loss(y1, y2, k1, k2, boxes1, boxes2)
  np.testing.assert_allclose(loss, _numpy_reference_loss(y1, y2, k1, k2, boxes1, boxes2),
                             rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 2.5])
def test_pixel_propagation_matches_numpy(gamma):
  x = _maps(2, key=0).reshape(2, H * W, C)
  value = _maps(2, key=1)[..., :5].reshape(2, H * W, 5)
  got = pixel_propagation(x, value, gamma)
  xn = np.asarray(x, np.float64)
  xn = xn / np.linalg.norm(xn, axis=-1, keepdims=True)
  want = np.zeros((2, H * W, 5))
  for n in range(2):
    for i in range(H * W):
      for j in range(H * W):
        a = max(float(xn[n, i] @ xn[n, j]), 0.0) ** gamma
        want[n, i] += a * np.asarray(value[n, j], np.float64)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # [b, h, w, C] input gives the same numbers in map layout.
  got_map = pixel_propagation(x.reshape(2, H, W, C), value.reshape(2, H, W, 5), gamma)
  np.testing.assert_allclose(got_map.reshape(2, H * W, 5), got, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda x: pixel_propagation(x, value, gamma).sum()))(x)
  assert np.all(np.isfinite(grad))


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _value_and_grads(y1, y2, k1, k2, boxes1, boxes2, axis_name=None):
  fn = lambda *maps: pixpro_loss(*maps, boxes1, boxes2, axis_name=axis_name)
  return jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(y1, y2, k1, k2)


@pytest.mark.parametrize("num_devices", [2, 8])
def test_sharded_matches_single_device(num_devices):
  b = 16
  y1, y2, k1, k2 = (_maps(b, key=i) for i in range(4))
  boxes1, boxes2 = _boxes(b, key=5), _boxes(b, key=6)
  (ref_loss, ref_metrics), ref_grads = _value_and_grads(y1, y2, k1, k2, boxes1, boxes2)
  assert 0.0 < float(ref_metrics["pos_fraction"]) < 1.0
  assert not np.any(ref_grads[2]) and not np.any(ref_grads[3])  # momentum maps: no gradient

  mesh = parallel.make_mesh(num_devices)
  data = P("data")
  fn = jax.jit(jax.shard_map(
      lambda *a: _value_and_grads(*a, axis_name="data"), mesh=mesh, in_specs=(data,) * 6,
      out_specs=((P(), P()), (data,) * 4)))
  sharding = parallel.batch_sharding(mesh)
  args = [jax.device_put(t, sharding) for t in (y1, y2, k1, k2, boxes1, boxes2)]
  (loss, metrics), grads = fn(*args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k, v in ref_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(grads[0])).max() > 1e-4


def test_rejects_mismatched_maps():
  with pytest.raises(ValueError, match="pixpro_loss"):
    pixpro_loss(_maps(2), _maps(2, h=2, w=2), _maps(2), _maps(2), _boxes(2), _boxes(2))

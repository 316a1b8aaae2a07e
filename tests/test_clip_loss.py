"""clip_loss: closed forms, invariances and 8-device parity of values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses, parallel


def _embeddings(b=16, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (b, d))
  y = x + 0.5 * jax.random.normal(k2, (b, d))
  return x, y


def test_identical_rows_give_log_batch_size():
  x = jnp.ones((4, 8))
  for scale in (1.0, 14.3, 100.0):
    loss, metrics = losses.clip_loss(x, x, scale)
    np.testing.assert_allclose(loss, math.log(4), rtol=1e-5)
  loss, _ = losses.clip_loss(jnp.ones((256, 3)), jnp.ones((256, 3)), 7.0)
  np.testing.assert_allclose(loss, 5.545177, rtol=1e-6)


def test_orthonormal_pairs_closed_form():
  x = jnp.eye(4, 8) * 3.0  # normalised inside
  s = 1 / 0.07
  loss, metrics = losses.clip_loss(x, x, s)
  # float32 logits near 14.3 resolve the loss to ~1e-7 absolute.
  np.testing.assert_allclose(loss, math.log1p(3 * math.exp(-s)), atol=1e-7)
  np.testing.assert_allclose(loss, 1.8746e-6, atol=1e-7)
  assert metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0
  np.testing.assert_allclose(metrics["pos_logit"], s, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], 0.0, atol=1e-6)


def test_aligned_pairs_at_large_scale_near_zero():
  x, _ = _embeddings(b=8, d=64)
  x = jnp.linalg.qr(x.T)[0].T  # orthonormal rows
  loss, _ = losses.clip_loss(x, x, 100.0)
  assert loss < 1e-6


def test_joint_permutation_and_modality_swap_invariance():
  x, y = _embeddings()
  perm = jax.random.permutation(jax.random.key(3), x.shape[0])
  ref, _ = losses.clip_loss(x, y, 10.0)
  np.testing.assert_allclose(losses.clip_loss(x[perm], y[perm], 10.0)[0], ref, rtol=1e-6)
  np.testing.assert_allclose(losses.clip_loss(y, x, 10.0)[0], ref, rtol=1e-6)


def test_scale_invariant_to_embedding_norm_and_dtype():
  x, y = _embeddings()
  ref, _ = losses.clip_loss(x, y, 10.0)
  np.testing.assert_allclose(losses.clip_loss(5 * x, 0.1 * y, 10.0)[0], ref, rtol=1e-5)
  bf, _ = losses.clip_loss(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), 10.0)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, ref, rtol=2e-2)


@pytest.mark.parametrize("num_devices", [2, 8])
def test_sharded_value_and_gradient_match_single_device(num_devices):
  x, y = _embeddings(b=16, d=8)
  scale = jnp.float32(12.0)

  def total(x, y, s):
    return losses.clip_loss(x, y, s)[0]

  ref_loss, ref_metrics = losses.clip_loss(x, y, scale)
  ref_grads = jax.grad(total, argnums=(0, 1, 2))(x, y, scale)

  mesh = parallel.make_mesh(num_devices)

  def local(x, y, s):
    loss, metrics = losses.clip_loss(x, y, s, axis_name="data")
    grads = jax.grad(
        lambda x, y, s: losses.clip_loss(x, y, s, axis_name="data")[0],
        argnums=(0, 1, 2))(x, y, s)
    return loss, metrics, grads

  fn = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
      out_specs=(P(), P(), (P("data"), P("data"), P()))))
  sharding = parallel.batch_sharding(mesh)
  loss, metrics, grads = fn(jax.device_put(x, sharding), jax.device_put(y, sharding), scale)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_pmap_value_and_gradient_match_single_device():
  x, y = _embeddings(b=16, d=8)
  scale = jnp.float32(12.0)
  ref_loss, _ = losses.clip_loss(x, y, scale)
  ref_gx = jax.grad(lambda x: losses.clip_loss(x, y, scale)[0])(x)

  def local(x, y):
    loss_fn = lambda x: losses.clip_loss(x, y, scale, axis_name="data")[0]
    loss, gx = jax.value_and_grad(loss_fn)(x)
    # Under pmap psum transposes to psum, so the per-device gradient carries a factor
    # W; the trainer's pmean of gradients removes it (see parallel.sync_gradients).
    return loss, gx / jax.lax.psum(1, "data")

  loss, gx = jax.pmap(local, axis_name="data")(x.reshape(8, 2, 8), y.reshape(8, 2, 8))
  np.testing.assert_allclose(loss, np.full(8, ref_loss), rtol=1e-6)
  np.testing.assert_allclose(gx.reshape(16, 8), ref_gx, rtol=1e-5, atol=1e-6)


def test_convirt_weighting_closed_forms():
  x, y = _embeddings()
  tau = 0.1
  clip_value, _ = losses.clip_loss(x, y, 1 / tau)
  half, _ = losses.convirt_loss(x, y, temperature=tau, i2t_weight=0.5)
  np.testing.assert_allclose(half, clip_value, rtol=1e-6)  # λ = ½ is CLIP at scale 1/τ
  # λ = 1 keeps only image->text: mean_i [LSE_j Z_ij - Z_ii].
  z = losses.l2_normalize(x) @ losses.l2_normalize(y).T / tau
  i2t = jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.diag(z))
  t2i = jnp.mean(jax.nn.logsumexp(z, axis=0) - jnp.diag(z))
  np.testing.assert_allclose(losses.convirt_loss(x, y, temperature=tau, i2t_weight=1.0)[0], i2t,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.convirt_loss(x, y, temperature=tau)[0],
                             0.75 * i2t + 0.25 * t2i, rtol=1e-5)
  same = jnp.ones((6, 4))
  np.testing.assert_allclose(losses.convirt_loss(same, same)[0], math.log(6), rtol=1e-5)


def test_zero_embeddings_give_finite_gradients():
  import jax
  import jax.numpy as jnp
  from contrastive_jax.losses import clip_loss as loss_fn, common
  x = jnp.zeros((4, 3)).at[0].set(1.0)  # rows 1..3 are zero vectors
  grads = jax.grad(lambda x, y: loss_fn(x, y, 10.0)[0], argnums=(0, 1))(x, x)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
  assert bool(jnp.isfinite(jax.jacobian(common.l2_normalize)(jnp.zeros(3))).all())

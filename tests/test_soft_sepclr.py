"""Soft contrastive loss (§2.26) and SepCLR (§2.6): reduction identities, fixed points,
the no-target property and 8-device value+gradient parity."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses, parallel
from contrastive_jax.losses import geometry
from contrastive_jax.losses.sepclr import sepclr_loss
from contrastive_jax.losses.soft_contrastive import soft_contrastive_loss

_grad = lambda fn, n=2: jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n)), has_aux=True))


def _arrays(b=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  c1 = jax.random.normal(ks[0], (b, 8))
  c2 = c1 + 0.5 * jax.random.normal(ks[1], (b, 8))
  s1 = jax.random.normal(ks[2], (b, 4))
  s2 = s1 + 0.3 * jax.random.normal(ks[3], (b, 4))
  is_target = jnp.arange(b) % 3 != 0
  labels = jax.random.randint(ks[4], (b,), -1, 3)
  return c1, c2, s1, s2, is_target, labels


def _sharded(fn, args, num_grads):
  """``value_and_grad(fn)`` on 8 devices, every argument sharded on its rows."""
  mesh = parallel.make_mesh(8)

  def local(*args):
    return jax.value_and_grad(lambda *g: fn(*g, *args[num_grads:], axis_name="data"),
                              argnums=tuple(range(num_grads)), has_aux=True)(*args[:num_grads])

  out_specs = ((P(), P()), (P("data"),) * num_grads)
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * len(args),
                                  out_specs=out_specs))
  return sharded(*[jax.device_put(a, parallel.batch_sharding(mesh)) for a in args])


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
  (loss, metrics), grads = got
  (ref, ref_metrics), ref_grads = want
  np.testing.assert_allclose(loss, ref, rtol=rtol)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=atol, err_msg=k)
  for g, r in zip(grads, ref_grads):
    assert np.abs(np.asarray(r)).max() > 1e-4
    np.testing.assert_allclose(g, r, rtol=10 * rtol, atol=atol)


def test_soft_weight_zero_is_nt_xent():
  c1, c2, *_ = _arrays()
  got = _grad(lambda a, b: soft_contrastive_loss(a, b, 0.2, weight=0.0))(c1, c2)
  (ref, _), ref_grads = _grad(lambda a, b: losses.nt_xent_loss(a, b, 0.2))(c1, c2)
  np.testing.assert_allclose(got[0][0], ref, rtol=1e-6)
  for g, r in zip(got[1], ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_soft_self_targets_are_a_fixed_point():
  # λ = 1, τ_t = τ: the target is the model's own distribution: loss = its entropy, grad = 0.
  c1, c2, *_ = _arrays()
  (loss, metrics), grads = _grad(lambda a, b: soft_contrastive_loss(a, b, 0.3, weight=1.0))(
      c1, c2)
  np.testing.assert_allclose(loss, metrics["target_entropy"], rtol=1e-5)
  for g in grads:
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
  # Pseudo-labels: an all-unknown batch is NT-Xent; labels only change the targets.
  fn = jax.jit(soft_contrastive_loss, static_argnames=("temperature", "weight"))
  unknown = -jnp.ones(c1.shape[0], jnp.int32)
  np.testing.assert_allclose(fn(c1, c2, temperature=0.2, weight=0.7, labels=unknown)[0],
                             losses.nt_xent_loss(c1, c2, 0.2)[0], rtol=1e-6)


def test_soft_eight_devices_match_single_device():
  # Pseudo-labels (gathered across devices); the similarity targets are the gathered logits'.
  c1, c2, *_, labels = _arrays(b=16)
  fn = lambda a, b, lab, axis_name=None: soft_contrastive_loss(
      a, b, 0.2, weight=0.4, labels=lab, axis_name=axis_name)
  _assert_close(_sharded(fn, (c1, c2, labels), 2), _grad(fn)(c1, c2, labels))


def _sep(c1, c2, s1, s2, is_target, axis_name=None):
  return sepclr_loss(c1, c2, s1, s2, is_target, temperature=0.2, bandwidth=0.8,
                     salient_weight=0.5, independence_weight=2.0, axis_name=axis_name)


def test_sepclr_terms_and_no_target_property():
  c1, c2, s1, s2, is_target, _ = _arrays()
  fn = _grad(_sep, 4)
  # All target: the common term is NT-Xent on c; no background term.
  (_, m), _ = fn(c1, c2, s1, s2, jnp.ones(8, bool))
  np.testing.assert_allclose(m["common"], losses.nt_xent_loss(c1, c2, 0.2)[0], rtol=1e-6)
  assert m["background"] == 0.0
  np.testing.assert_allclose(m["salient_alignment"],
                             np.mean(np.sum((np.asarray(s1) - np.asarray(s2)) ** 2, 1)),
                             rtol=1e-5)
  s = jnp.concatenate([s1, s2])
  np.testing.assert_allclose(m["salient_uniformity"],
                             geometry.log_mean_gaussian(s, normalize=False), rtol=1e-5)
  # No target: the salient embeddings only feel the background pull to the null vector.
  (loss, m), grads = fn(c1, c2, s1, s2, jnp.zeros(8, bool))
  assert m["salient"] == 0.0 and m["independence"] == 0.0
  np.testing.assert_allclose(grads[2], 2 * s1 / 16, rtol=1e-5)  # ∂ mean‖s‖² over 2B rows
  np.testing.assert_allclose(grads[3], 2 * s2 / 16, rtol=1e-5)
  # Collapsed background salient embeddings cost nothing.
  zero = jnp.zeros_like(s1)
  (_, m), _ = fn(c1, c2, zero, zero, jnp.zeros(8, bool))
  assert m["background"] == 0.0


def test_sepclr_eight_devices_match_single_device():
  c1, c2, s1, s2, is_target, _ = _arrays(b=16)
  args = (c1, c2, s1, s2, is_target)
  _assert_close(_sharded(_sep, args, 4), _grad(_sep, 4)(*args))

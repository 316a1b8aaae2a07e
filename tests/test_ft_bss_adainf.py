"""FT (losses/feature_transform.py), same-cluster negatives (losses/suppression.py), BSS
(data/batch_styles.py) and AdaInf inflation (data/inflation.py): closed forms, reductions to
MoCo / NT-Xent, 8-device parity of value and gradients, the Fourier properties of BSS, the
inflated stream's composition, and SimCLR unchanged with the options off."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from contrastive_jax import parallel
from contrastive_jax.data import batch_styles, inflation, pipeline
from contrastive_jax.losses import feature_transform as ft
from contrastive_jax.losses import moco, simclr, suppression

TAU = 0.2
_ft_loss = jax.jit(jax.value_and_grad(
    lambda q, k, u, rng, **kw: ft.ft_moco_loss(q, k, u, TAU, rng=rng, **kw), has_aux=True),
    static_argnames=("alpha_pos", "alpha_neg", "per_dim", "renormalize"))
_draw = jax.jit(functools.partial(ft.sample_lambdas, queue_size=24, dim=8),
                static_argnames=("num_rows", "per_dim"))


def _inputs(b=16, d=8, k_q=24, seed=0):
  kq, kk, kqueue = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, d))
  k = q + 0.7 * jax.random.normal(kk, (b, d))
  return q, k, moco.init_queue(k_q, d, kqueue)["keys"]


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------- FT


def test_ft_with_unit_lambdas_is_moco():
  q, k, queue = _inputs()
  (loss, metrics), grad = _ft_loss(q, k, queue, None)
  (ref, ref_metrics), ref_grad = jax.jit(jax.value_and_grad(
      lambda q: moco.moco_loss(q, k, queue, TAU), has_aux=True))(q)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  for name in ("acc", "pos_logit", "neg_logit"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6)
  assert float(metrics["lam_pos"]) == float(metrics["lam_neg"]) == 1.0
  # Explicit λ⁺ = λ⁻ = 1 with any permutation transforms nothing either.
  perm = jax.random.permutation(jax.random.key(1), queue.shape[0])
  q2, k2, u2 = ft.transform_features(q, k, queue, 1.0, 1.0, perm)
  np.testing.assert_allclose(q2, _unit(q), rtol=1e-6)
  np.testing.assert_allclose(k2, _unit(k), rtol=1e-6)
  np.testing.assert_allclose(u2, _unit(queue), rtol=1e-6)


def test_ft_matches_numpy_on_the_transformed_features():
  q, k, queue = _inputs()
  rng = jax.random.key(7)
  (loss, metrics), _ = _ft_loss(q, k, queue, rng)
  lam_pos, lam_neg, perm = _draw(rng, num_rows=16, per_dim=False, row_offset=0)
  lp, ln, perm = float(lam_pos[0, 0]), float(lam_neg[0, 0]), np.asarray(perm)
  assert 1.0 <= lp <= 2.0 and 0.0 <= ln <= 1.0
  np.testing.assert_array_equal(np.sort(perm), np.arange(24))
  qn, kn, un = _unit(q), _unit(k), _unit(queue)
  q2, k2 = lp * qn + (1 - lp) * kn, lp * kn + (1 - lp) * qn
  u2 = ln * un + (1 - ln) * un[perm]
  logits = np.concatenate([np.sum(q2 * k2, 1, keepdims=True), q2 @ u2.T], 1) / TAU
  m = logits.max(1)
  want = np.mean(np.log(np.exp(logits - m[:, None]).sum(1)) + m - logits[:, 0])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["lam_pos"], lp, rtol=1e-6)
  # METHODS.md §2.10: ‖q'‖² = λ² + (1 − λ)² + 2λ(1 − λ)c for unit q, k with cosine c.
  c = np.sum(qn * kn, 1)
  np.testing.assert_allclose(np.sum(q2 * q2, 1), lp**2 + (1 - lp)**2 + 2 * lp * (1 - lp) * c,
                             rtol=1e-9)
  # Extrapolation makes the positive harder: q'·k' < q̂·k̂ whenever λ⁺ > 1 and c < 1.
  assert np.all(np.sum(q2 * k2, 1) < c)


def test_ft_gradient_flows_through_q_in_both_transformed_features():
  q, k, queue = _inputs()
  rng = jax.random.key(7)
  _, gq = _ft_loss(q, k, queue, rng)
  lam_pos, lam_neg, perm = _draw(rng, num_rows=16, per_dim=False, row_offset=0)

  def manual(q, k, u, through_k=True):
    q2, k2, u2 = ft.transform_features(q, k, u, lam_pos, lam_neg, perm)
    k2 = k2 if through_k else jax.lax.stop_gradient(k2)
    logits = jnp.concatenate([jnp.sum(q2 * k2, 1, keepdims=True), q2 @ u2.T], 1) / TAU
    return jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 0])

  grads = jax.jit(jax.grad(manual, argnums=(0, 1, 2)))(q, k, queue)
  np.testing.assert_allclose(gq, grads[0], rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(grads[1], 0.0)  # keys and queue are constants
  np.testing.assert_array_equal(grads[2], 0.0)
  only_q = jax.jit(jax.grad(lambda q: manual(q, k, queue, through_k=False)))(q)
  assert not np.allclose(gq, only_q, rtol=1e-3, atol=1e-5)


def test_ft_per_dimension_draws_are_keyed_by_global_row():
  full, neg, perm = _draw(jax.random.key(11), num_rows=16, per_dim=True, row_offset=0)
  assert full.shape == (16, 8) and neg.shape == (24, 8)
  assert float(full.min()) >= 1.0 and float(full.max()) <= 2.0 and float(full.std()) > 0.05
  part, neg4, perm4 = _draw(jax.random.key(11), num_rows=16, per_dim=True, row_offset=4)
  np.testing.assert_array_equal(part[:12], full[4:])
  np.testing.assert_array_equal(neg4, neg)  # the queue side is the same on every device
  np.testing.assert_array_equal(perm4, perm)


@pytest.mark.parametrize("per_dim", [False])
def test_ft_eight_devices_match_one_device(per_dim):
  q, k, queue = _inputs()
  rng = jax.random.key(11)

  def fn(q, k, queue, rng, axis_name=None):
    f = lambda q: ft.ft_moco_loss(q, k, queue, TAU, rng=rng, per_dim=per_dim, renormalize=True,
                                  axis_name=axis_name)
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(q)
    return loss, metrics, g

  ref_loss, ref_metrics, ref_grad = jax.jit(fn)(q, k, queue, rng)
  mesh = parallel.make_mesh(8)
  mapped = jax.jit(jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh,
                                 in_specs=(P("data"), P("data"), P(), P()),
                                 out_specs=(P(), P(), P("data"))))
  sh = parallel.batch_sharding(mesh)
  loss, metrics, grad = mapped(jax.device_put(q, sh), jax.device_put(k, sh), queue, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name in ref_metrics:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ same-cluster negatives


def _numpy_same_cluster(z1, z2, ids, tau):
  h = np.concatenate([_unit(z1), _unit(z2)])
  ids = np.concatenate([ids, ids])
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    p = (i + n) % (2 * n)
    cols = [p] + [j for j in range(2 * n) if j not in (i, p) and ids[j] == ids[i]]
    logits = h[cols] @ h[i] / tau
    total += np.log(np.exp(logits).sum()) - logits[0]
  return total / (2 * n)


def test_same_cluster_loss_closed_forms_and_reductions():
  z1, z2, _ = _inputs(b=8, d=8, k_q=8, seed=2)
  loss_fn = jax.jit(suppression.same_cluster_nt_xent_loss, static_argnames=("temperature",))
  ids = jnp.array([0, 1, 0, 2, 1, 0, 2, 2])
  loss, metrics = loss_fn(z1, z2, ids, temperature=0.1)
  np.testing.assert_allclose(loss, _numpy_same_cluster(z1, z2, np.asarray(ids), 0.1), rtol=1e-5)
  # Per anchor: 2·|own cluster| − 2 negatives.
  np.testing.assert_allclose(metrics["negatives"], np.mean([2 * 3 - 2] * 6 + [2 * 2 - 2] * 4
                                                           + [2 * 3 - 2] * 6), rtol=1e-6)
  one, _ = loss_fn(z1, z2, jnp.zeros(8, jnp.int32), temperature=0.1)
  np.testing.assert_allclose(one, simclr.nt_xent_loss(z1, z2, 0.1)[0], rtol=1e-6)
  alone, m = loss_fn(z1, z2, jnp.arange(8), temperature=0.1)
  np.testing.assert_allclose(alone, 0.0, atol=1e-6)
  assert float(m["negatives"]) == 0.0
  # Two stages: negatives share the anchor's cluster in both.
  two = jnp.stack([jnp.zeros(8, jnp.int32), ids], 1)
  np.testing.assert_allclose(loss_fn(z1, z2, two, temperature=0.1)[0], loss, rtol=1e-6)
  # Moving the examples of other clusters does not change the terms of cluster 0's anchors.
  moved1 = z1.at[jnp.array([1, 3, 4])].set(5.0)
  per_anchor = lambda a, b: loss_fn(a, b, jnp.where(ids == 0, 0, jnp.arange(8) + 10),
                                    temperature=0.1)[0]
  np.testing.assert_allclose(per_anchor(moved1, z2), per_anchor(z1, z2), rtol=1e-6)


def test_same_cluster_loss_eight_devices_match_one_device():
  z1, z2, _ = _inputs(b=16, d=8, k_q=8, seed=4)
  ids = jnp.arange(16) % 3

  def fn(a, b, ids, axis_name=None):
    f = lambda a, b: suppression.same_cluster_nt_xent_loss(a, b, ids, 0.1, axis_name=axis_name)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, b)

  ref = jax.jit(fn)(z1, z2, ids)
  mesh = parallel.make_mesh(8)
  mapped = jax.jit(jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh,
                                 in_specs=(P("data"),) * 3,
                                 out_specs=((P(), P()), (P("data"), P("data")))))
  sh = parallel.batch_sharding(mesh)
  got = mapped(*(jax.device_put(x, sh) for x in (z1, z2, ids)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- BSS


def _images(n=4, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


def test_bss_keeps_phase_and_high_frequencies_and_shares_the_low_frequency_amplitude():
  x = _images()
  r = 0.2
  out = batch_styles.standardize_to(x, 2, r)
  spec_in = np.fft.fft2(np.asarray(x, np.float64), axes=(1, 2))
  spec_out = np.fft.fft2(np.asarray(out, np.float64), axes=(1, 2))
  mask = np.asarray(batch_styles.low_frequency_mask(16, 16, r))
  assert 0.1 < mask.mean() < 0.3 and mask[0, 0] and not mask[8, 8]
  amp_in, amp_out = np.abs(spec_in), np.abs(spec_out)
  # Content: every image keeps its phase (where the amplitude is not ~0).
  ok = (amp_in > 1e-3) & (amp_out > 1e-3)
  phase_diff = np.angle(spec_out * np.conj(spec_in))
  np.testing.assert_allclose(np.where(ok, phase_diff, 0.0), 0.0, atol=1e-3)
  # Style: the low-frequency amplitude of every image is the source's; the rest is unchanged.
  for i in range(4):
    np.testing.assert_allclose(amp_out[i][mask], amp_in[2][mask], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(amp_out[i][~mask], amp_in[i][~mask], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(out[2], x[2], atol=1e-5)  # the source itself is unchanged
  assert np.abs(np.asarray(out[0] - x[0])).max() > 0.05


def test_bss_identities():
  x = _images()
  key = jax.random.key(0)
  np.testing.assert_array_equal(batch_styles.batch_style_standardize(x, key, 0.0), x)
  np.testing.assert_allclose(batch_styles.batch_style_standardize(x[:1], key, 0.5), x[:1],
                             atol=1e-5)
  sources = {int(jax.random.randint(jax.random.key(s), (), 0, 4)) for s in range(12)}
  assert len(sources) > 1  # the source image is drawn, not fixed
  with pytest.raises(ValueError, match="ratio"):
    batch_styles.low_frequency_mask(8, 8, 1.5)


# ---------------------------------------------------------------- SimCLR with the options


def _simclr(bss_ratio=None):
  from contrastive_jax.objectives import simclr as simclr_objective
  config = tiny_config("simclr_shapes")
  if bss_ratio is not None:
    config.loss.bss_ratio = bss_ratio
  return simclr_objective.SimClr(config)


def test_simclr_options_off_is_simclr_and_bss_standardizes_each_view():
  views = jax.ShapeDtypeStruct((8, 2, 32, 32, 3), jnp.float32)
  batch = {"views": views, "index": jax.ShapeDtypeStruct((8,), jnp.int32)}
  plain, off, on = _simclr(), _simclr(0.0), _simclr(0.3)
  params, state = jax.eval_shape(plain.init, jax.random.key(0), batch)
  rng = jax.eval_shape(lambda: jax.random.key(5))

  def trace(fn):  # the traced program of fn(params, state, batch, rng), as text
    return str(jax.make_jaxpr(fn)(params, state, batch, rng))

  # Off: the very same program as plain SimCLR.
  assert trace(off.loss) == trace(plain.loss)
  # On: plain SimCLR applied to views standardised with one fresh source per view.
  def reference(p, s, b, rng):
    v = b["views"]
    styled = jnp.stack([batch_styles.batch_style_standardize(v[:, i], jax.random.fold_in(rng, i),
                                                             0.3) for i in range(2)], axis=1)
    return plain.loss(p, s, dict(b, views=styled), rng)

  assert trace(on.loss) == trace(reference)
  assert trace(on.loss) != trace(plain.loss)
  assert trace(on.loss) != trace(_simclr(0.2).loss)  # the ratio is in the program


# ---------------------------------------------------------------------------------- AdaInf


def test_inflated_epoch_holds_dup_copies_of_the_real_set_and_the_generated_set():
  n, m, dup = 5, 7, 3
  slots = [inflation.slot(tf.constant(p, tf.int64), num_real=n, num_generated=m, dup=dup,
                          seed=0) for p in range(2 * (dup * n + m))]
  for epoch in range(2):
    part = slots[epoch * (dup * n + m):(epoch + 1) * (dup * n + m)]
    real = sorted(int(r) for g, r in part if not bool(g))
    gen = sorted(int(r) for g, r in part if bool(g))
    assert real == sorted(list(range(n)) * dup) and gen == list(range(m))
  order = [(bool(g), int(r)) for g, r in slots]
  assert order[:dup * n + m] != order[dup * n + m:]  # a fresh permutation every epoch


def test_inflated_batches_mark_and_degrade_the_generated_rows():
  config = tiny_config("simclr_adainf_shapes")
  config.batch_size = 8
  config.data.inflation.update(num_real=3, num_generated=5, dup=1)
  batch = next(iter(pipeline.train_dataset(config).take(1).as_numpy_iterator()))
  assert batch["views"].shape == (8, 2, 32, 32, 3)
  index = batch["index"]
  gen = index >= 3
  assert sorted(index[~gen]) == [0, 1, 2] and sorted(index[gen]) == [3, 4, 5, 6, 7]
  # Degraded: smoother than the same scene of the generated stream at full resolution.
  from contrastive_jax.data import shapes
  row = int(np.argmax(gen))
  raw = shapes.make_example(int(index[row]) - 3, seed=config.data.seed + 1, image_size=32,
                            min_objects=config.data.min_objects,
                            max_objects=config.data.max_objects)["image"]
  raw = np.asarray(raw, np.float32) / 127.5 - 1.0
  tv = lambda im: np.abs(np.diff(np.asarray(im, np.float32), axis=0)).mean()
  assert tv(batch["image"][row]) < 0.8 * tv(raw)
  np.testing.assert_allclose(batch["image"][row].mean(), raw.mean(), atol=0.05)  # same scene
  with pytest.raises(ValueError, match="dup"):
    inflation.settings(dict(config.data, inflation=dict(num_real=4, num_generated=1, dup=0)))

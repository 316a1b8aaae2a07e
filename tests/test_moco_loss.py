"""MoCo-v2 / MoCHi (losses/moco.py): numpy InfoNCE, mixing geometry, no-grad paths, FIFO queue,
8-device parity of the loss and of the queue."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import moco


_loss = jax.jit(moco.moco_loss, static_argnames=("temperature", "num_hard", "num_mix",
                                                "num_query_mix", "axis_name"))
_mix = jax.jit(moco.mix_hard_negatives, static_argnames=("num_hard", "num_mix",
                                                         "num_query_mix"))


def _inputs(b=16, d=8, k_q=24, seed=0):
  kq, kk, kqueue = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, d))
  k = q + 0.7 * jax.random.normal(kk, (b, d))
  queue = moco.init_queue(k_q, d, kqueue)["keys"]
  return q, k, queue


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_infonce(q, k, queue, tau, extra=None):
  """Cross-entropy with target 0 over [q·k, q·queue, q·extra_i] per row, float64."""
  q, k, queue = _unit(q), _unit(k), _unit(queue)
  total = 0.0
  for i in range(q.shape[0]):
    logits = [q[i] @ k[i]] + list(queue @ q[i])
    if extra is not None:
      logits += list(_unit(extra[i]) @ q[i])
    logits = np.asarray(logits) / tau
    total += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0]
  return total / q.shape[0]


def test_matches_numpy_infonce_and_metrics():
  q, k, queue = _inputs()
  loss, metrics = _loss(q, k, queue, temperature=0.2)
  np.testing.assert_allclose(loss, _numpy_infonce(q, k, queue, 0.2), rtol=1e-5)
  qn, kn, un = _unit(q), _unit(k), _unit(queue)
  pos = np.sum(qn * kn, 1) / 0.2
  neg = qn @ un.T / 0.2
  np.testing.assert_allclose(metrics["pos_logit"], pos.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["neg_logit"], neg.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["acc"], np.mean(pos > neg.max(1)))
  assert "mix_logit" not in metrics


def test_no_mixing_is_plain_moco_even_with_rng():
  q, k, queue = _inputs()
  ref, _ = _loss(q, k, queue, temperature=0.2)
  same, _ = _loss(q, k, queue, temperature=0.2, rng=jax.random.key(3), num_hard=8)
  np.testing.assert_array_equal(same, ref)
  mixed, metrics = _loss(q, k, queue, temperature=0.2, rng=jax.random.key(3), num_hard=8,
                                  num_mix=4, num_query_mix=2)
  assert float(mixed) > float(ref) + 1e-3  # extra negatives only ever raise the loss
  assert "mix_logit" in metrics


def test_mixed_loss_is_infonce_with_the_synthetic_negatives_appended():
  q, k, queue = _inputs()
  rng = jax.random.key(5)
  loss, metrics = _loss(q, k, queue, temperature=0.2, rng=rng, num_hard=6, num_mix=5,
                                 num_query_mix=3)
  synth = _mix(q, queue, rng, num_hard=6, num_mix=5, num_query_mix=3)
  assert synth.shape == (16, 8, 8)
  np.testing.assert_allclose(loss, _numpy_infonce(q, k, queue, 0.2, synth), rtol=1e-5)
  mix = np.einsum("bd,bsd->bs", _unit(q), np.asarray(synth)) / 0.2
  np.testing.assert_allclose(metrics["mix_logit"], mix.mean(), rtol=1e-5, atol=1e-6)


def _fit(basis, h):
  """Least-squares coefficients of ``h`` on the columns of ``basis`` and the residual norm."""
  coef, *_ = np.linalg.lstsq(basis, h, rcond=None)
  return coef, np.linalg.norm(basis @ coef - h)


def test_mixing_geometry():
  b, d, k_q, n_hard, s, s2 = 6, 16, 40, 5, 12, 12
  q, _, queue = _inputs(b=b, d=d, k_q=k_q, seed=1)
  synth = np.asarray(_mix(q, queue, jax.random.key(2), num_hard=n_hard,
                                             num_mix=s, num_query_mix=s2), np.float64)
  assert synth.shape == (b, s + s2, d)
  np.testing.assert_allclose(np.linalg.norm(synth, axis=-1), 1.0, rtol=1e-5)
  qn, un = _unit(q), _unit(queue)
  top = np.argsort(-(qn @ un.T), axis=1)[:, :n_hard]
  np.testing.assert_array_equal(np.sort(moco.hard_negative_indices(q, queue, n_hard), 1),
                                np.sort(top, 1))
  alphas, betas = [], []
  for i in range(b):
    hard = un[top[i]]
    for h in synth[i, :s]:  # type 1: a non-negative mix of two of the query's hard negatives
      fits = []
      for a, c in itertools.combinations_with_replacement(range(n_hard), 2):
        coef, res = _fit(np.stack([hard[a], hard[c]], 1), h)
        if res < 1e-4 and (a == c or coef.min() > -1e-4):
          fits.append(coef[0] / coef.sum() if a != c else None)
      assert fits, f"type-1 negative of row {i} is not a mix of two hard negatives"
      alphas += [f for f in fits if f is not None]
    for h in synth[i, s:]:  # type 2: β q + (1 − β) n_c with β < 0.5
      fits = []
      for c in range(n_hard):
        coef, res = _fit(np.stack([qn[i], hard[c]], 1), h)
        if res < 1e-4 and coef.min() > -1e-4:
          fits.append(coef[0] / coef.sum())
      assert fits, f"type-2 negative of row {i} is not a query/hard-negative mix"
      betas += fits
  alphas, betas = np.asarray(alphas), np.asarray(betas)
  assert betas.min() >= -1e-4 and betas.max() < 0.5
  assert betas.max() > 0.3 and betas.min() < 0.2  # really drawn from U(0, 0.5)
  assert alphas.min() < 0.3 and alphas.max() > 0.7  # really drawn from U(0, 1)


def test_draws_are_keyed_by_global_row():
  q, _, queue = _inputs()
  kw = dict(num_hard=4, num_mix=3, num_query_mix=2)
  full = _mix(q, queue, jax.random.key(9), **kw)
  part = _mix(q[4:8], queue, jax.random.key(9), row_offset=4, **kw)
  np.testing.assert_array_equal(part, full[4:8])
  shifted = _mix(q[4:8], queue, jax.random.key(9), row_offset=0, **kw)
  assert not np.allclose(shifted, full[4:8])


def test_no_gradient_reaches_keys_queue_or_synthetic_negatives():
  q, k, queue = _inputs()
  rng = jax.random.key(4)
  kw = dict(num_hard=6, num_mix=4, num_query_mix=4)
  fn = lambda q, k, u: moco.moco_loss(q, k, u, 0.2, rng=rng, **kw)[0]
  gq, gk, gu = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(q, k, queue)
  np.testing.assert_array_equal(gk, 0.0)
  np.testing.assert_array_equal(gu, 0.0)
  synth = _mix(q, queue, rng, **kw)

  def frozen(q):  # the same loss with the synthetic negatives as constants
    qn = q / (jnp.linalg.norm(q, axis=1, keepdims=True) + 1e-8)
    kn = k / (jnp.linalg.norm(k, axis=1, keepdims=True) + 1e-8)
    un = queue / (jnp.linalg.norm(queue, axis=1, keepdims=True) + 1e-8)
    logits = jnp.concatenate([jnp.sum(qn * kn, 1, keepdims=True), qn @ un.T,
                              jnp.einsum("bd,bsd->bs", qn, synth)], 1) / 0.2
    return jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 0])

  np.testing.assert_allclose(gq, jax.grad(frozen)(q), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(gq)).max() > 1e-3


@pytest.mark.parametrize("mixing", [False, True])
def test_eight_devices_match_one_device(mixing):
  q, k, queue = _inputs()
  rng = jax.random.key(11)
  kw = dict(rng=rng, num_hard=6, num_mix=4, num_query_mix=3) if mixing else {}

  def fn(q, k, queue, rng, axis_name=None):
    kws = dict(kw, rng=rng) if mixing else {}
    f = lambda q: _loss(q, k, queue, temperature=0.2, axis_name=axis_name, **kws)
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(q)
    return loss, metrics, g

  ref_loss, ref_metrics, ref_grad = fn(q, k, queue, rng)
  mesh = parallel.make_mesh(8)
  mapped = jax.jit(jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh,
                                 in_specs=(P("data"), P("data"), P(), P()),
                                 out_specs=(P(), P(), P("data"))))
  sh = parallel.batch_sharding(mesh)
  loss, metrics, grad = mapped(jax.device_put(q, sh), jax.device_put(k, sh), queue, rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for name in ref_metrics:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_enqueue_is_fifo_with_wrap_around():
  size, d, b = 10, 3, 4  # 10 is not a multiple of 4
  queue = moco.init_queue(size, d, jax.random.key(0))
  ref = list(np.asarray(queue["keys"]))
  ptr = 0
  step = jax.jit(moco.enqueue)
  for t in range(5):
    keys = jax.random.normal(jax.random.key(t + 1), (b, d)) * (t + 2)
    # Step 3 runs eagerly on host (numpy) arrays, as a restored checkpoint may hold them.
    queue = moco.enqueue(jax.device_get(queue), keys) if t == 2 else step(queue, keys)
    for row in _unit(keys):
      ref[ptr] = row
      ptr = (ptr + 1) % size
    assert int(queue["ptr"]) == ptr
    assert queue["ptr"].dtype == jnp.int32 and queue["keys"].dtype == jnp.float32
    np.testing.assert_allclose(queue["keys"], np.stack(ref), rtol=1e-6, atol=1e-7)
  # After 20 writes the newest 10 keys fill the queue: steps 4 and 5 (rows 8, 9, 0..7).
  assert ptr == 0


def test_enqueue_rejects_a_batch_larger_than_the_queue():
  queue = moco.init_queue(6, 3, jax.random.key(0))
  with pytest.raises(ValueError, match="6.*8"):
    moco.enqueue(queue, jnp.ones((8, 3)))


def test_enqueue_on_eight_devices_is_global_order_and_replicated():
  size, d = 20, 4
  queue = moco.init_queue(size, d, jax.random.key(0))
  queue = moco.enqueue(queue, jax.random.normal(jax.random.key(1), (16, d)))  # ptr = 16
  keys = jax.random.normal(jax.random.key(2), (16, d))
  ref = moco.enqueue(queue, keys)  # wraps: rows 16..19, then 0..11
  mesh = parallel.make_mesh(8)
  mapped = jax.jit(jax.shard_map(lambda q, k: moco.enqueue(q, k, axis_name="data"), mesh=mesh,
                                 in_specs=(P(), P("data")), out_specs=P()))
  out = mapped(queue, jax.device_put(keys, parallel.batch_sharding(mesh)))
  np.testing.assert_allclose(out["keys"], ref["keys"], rtol=1e-6, atol=1e-7)
  assert int(out["ptr"]) == int(ref["ptr"]) == 12
  np.testing.assert_allclose(out["keys"][16:], _unit(keys[:4]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out["keys"][:12], _unit(keys[4:]), rtol=1e-6, atol=1e-7)
  shards = [np.asarray(s.data) for s in out["keys"].addressable_shards]
  assert len(shards) == 8
  for s in shards[1:]:
    np.testing.assert_array_equal(s, shards[0])
  with pytest.raises(ValueError, match="20.*24"):
    jax.shard_map(lambda q, k: moco.enqueue(q, k, axis_name="data"), mesh=mesh,
                  in_specs=(P(), P("data")), out_specs=P())(
                      queue, jax.device_put(jnp.ones((24, d)), parallel.batch_sharding(mesh)))

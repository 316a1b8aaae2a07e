"""iSogCLR (losses/isogclr.py): numpy reference of one step, the γ=1 exact-gradient identity,
temperature bounds, zero surrogate on equal similarities, touched rows, 8-device parity."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import isogclr

_STATIC = ("bimodal", "include_self", "axis_name")
_loss = jax.jit(isogclr.isogclr_loss, static_argnames=_STATIC)
_grad = jax.jit(jax.grad(lambda z1, z2, idx, st, **kw: isogclr.isogclr_loss(
    z1, z2, idx, st, **kw)[0], argnums=(0, 1)), static_argnames=_STATIC)


def _views(b=8, d=6, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  z1 = jax.random.normal(k1, (b, d))
  z2 = z1 + 0.8 * jax.random.normal(k2, (b, d))
  return z1, z2


def _random_state(n, seed=1):
  ku, kb, kt, km = jax.random.split(jax.random.key(seed), 4)
  return {
      "u": jax.random.uniform(ku, (n, 2), minval=0.05, maxval=2.0),
      "b": jax.random.uniform(kb, (n, 2), minval=0.0, maxval=4.0),
      "tau": jax.random.uniform(kt, (n, 2), minval=0.05, maxval=0.5),
      "m": jax.random.normal(km, (n, 2)),
  }


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_step(z1, z2, index, state, *, bimodal, include_self, gamma, rho, eta, beta_u,
                tau_min, tau_max):
  """One step written independently with loops, float64. Returns (loss, objectives, state)."""
  x, y = _unit(z1), _unit(z2)
  big_b = x.shape[0]
  st = {k: np.array(v, np.float64) for k, v in state.items()}
  new = {k: v.copy() for k, v in st.items()}
  loss, objectives = 0.0, [0.0, 0.0]
  for c in range(2):
    for i in range(big_b):
      if bimodal:
        anchor, pos = (x[i], y[i]) if c == 0 else (y[i], x[i])
        cands = [(y if c == 0 else x)[j] for j in range(big_b) if include_self or j != i]
        n = big_b - 1
      else:
        views = np.concatenate([x, y])
        own, pos_row = (i, big_b + i) if c == 0 else (big_b + i, i)
        anchor, pos = views[own], views[pos_row]
        cands = [views[j] for j in range(2 * big_b)
                 if j != own and (include_self or j != pos_row)]
        n = 2 * big_b - 2
      k = index[i]
      tau, b_old, u_old, m_old = st["tau"][k, c], st["b"][k, c], st["u"][k, c], st["m"][k, c]
      d = np.array([anchor @ v - anchor @ pos for v in cands])
      e = d / tau
      b_new = max(b_old, e.max())
      u_new = (1 - gamma) * u_old * np.exp(b_old - b_new) + gamma * np.exp(e - b_new).sum() / n
      w = np.exp(e - b_new) / (u_new + 1e-10)
      loss += (w * d).sum() / n / big_b
      grad_tau = np.log(u_new) + b_new + rho - (w * e).sum() / n
      m_new = (1 - beta_u) * m_old + beta_u * np.clip(grad_tau, -5, 5)
      new["u"][k, c], new["b"][k, c], new["m"][k, c] = u_new, b_new, m_new
      new["tau"][k, c] = np.clip(tau - eta * m_new, tau_min, tau_max)
      objectives[c] += tau * (np.log(u_new) + b_new) / big_b
  return loss, objectives, new


HP = dict(gamma=0.8, rho=6.0, eta=0.03, beta_u=0.9, tau_min=0.005, tau_max=1.0)


@pytest.mark.parametrize("bimodal,include_self",
                         list(itertools.product([True, False], [False, True])))
def test_one_step_matches_numpy(bimodal, include_self):
  z1, z2 = _views(b=5, d=4)
  index = np.array([7, 2, 10, 0, 4])
  state = _random_state(12)
  loss, (metrics, new) = _loss(z1, z2, index, state, bimodal=bimodal,
                               include_self=include_self, **HP)
  ref_loss, ref_obj, ref_new = _numpy_step(np.asarray(z1), np.asarray(z2), index, state,
                                           bimodal=bimodal, include_self=include_self, **HP)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-6)
  for name in ("u", "b", "tau", "m"):
    assert new[name].dtype == jnp.float32 and new[name].shape == (12, 2)
    np.testing.assert_allclose(new[name], ref_new[name], rtol=1e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics["objective_1"], ref_obj[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["objective_2"], ref_obj[1], rtol=1e-4, atol=1e-6)
  used = np.asarray(state["tau"])[index]
  np.testing.assert_allclose(metrics["tau_mean"], used.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["tau_min"], used.min(), rtol=1e-6)
  np.testing.assert_allclose(metrics["tau_max"], used.max(), rtol=1e-6)


def test_include_self_changes_the_result():
  z1, z2 = _views()
  index, state = np.arange(8), _random_state(8)
  for bimodal in (True, False):
    a = _loss(z1, z2, index, state, bimodal=bimodal, include_self=False)
    b = _loss(z1, z2, index, state, bimodal=bimodal, include_self=True)
    assert abs(float(a[0]) - float(b[0])) > 1e-4
    assert not np.allclose(a[1][1]["u"], b[1][1]["u"])


def _minibatch_objective(z1, z2, tau, bimodal):
  """Σ over anchor sets of mean_i τ_i log mean_{j ∈ S_i⁻} exp(d_ij / τ_i), written directly."""
  x = z1 / jnp.linalg.norm(z1, axis=1, keepdims=True)
  y = z2 / jnp.linalg.norm(z2, axis=1, keepdims=True)
  n = x.shape[0]
  if bimodal:
    s = x @ y.T
    diag = jnp.diag(s)
    neg = ~jnp.eye(n, dtype=bool)
    d_sets = [s - diag[:, None], s.T - diag[:, None]]  # image rows, text columns
    masks = [neg, neg]
  else:
    h = jnp.concatenate([x, y])
    s = h @ h.T
    pos = jnp.concatenate([jnp.diag(s, n), jnp.diag(s, -n)])
    keep = ~(jnp.eye(2 * n, dtype=bool) | jnp.eye(2 * n, k=n, dtype=bool)
             | jnp.eye(2 * n, k=-n, dtype=bool))
    d_all = s - pos[:, None]
    d_sets, masks = [d_all[:n], d_all[n:]], [keep[:n], keep[n:]]
  total = 0.0
  for c, (d, mask) in enumerate(zip(d_sets, masks)):
    t = tau[:, c][:, None]
    lme = jax.nn.logsumexp(jnp.where(mask, d / t, -jnp.inf), axis=1) - jnp.log(mask.sum(1))
    total += jnp.mean(t[:, 0] * lme)
  return total


_ref_value = jax.jit(_minibatch_objective, static_argnums=3)
_ref_grad = jax.jit(jax.grad(_minibatch_objective, argnums=(0, 1)), static_argnums=3)
_differences = jax.jit(isogclr.differences, static_argnames=_STATIC)


@pytest.mark.parametrize("bimodal", [True, False])
def test_gamma_one_gives_the_exact_minibatch_gradient(bimodal):
  z1, z2 = _views()
  index = np.array([3, 0, 6, 1, 7, 2, 5, 4])
  state = _random_state(8, seed=3)
  state["b"] = jnp.full((8, 2), -1e4)  # b becomes the exact row max of this batch
  gz1, gz2 = _grad(z1, z2, index, state, bimodal=bimodal, gamma=1.0)
  tau = state["tau"][index]
  rz1, rz2 = _ref_grad(z1, z2, tau, bimodal)
  np.testing.assert_allclose(gz1, rz1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gz2, rz2, rtol=1e-4, atol=1e-6)
  _, (metrics, new) = _loss(z1, z2, index, state, bimodal=bimodal, gamma=1.0)
  np.testing.assert_allclose(metrics["objective_1"] + metrics["objective_2"],
                             _ref_value(z1, z2, tau, bimodal), rtol=1e-5)
  # The stored b is the row max of e = d / τ over the negatives (here ≤ 0 is possible).
  ref_b = []
  for c in range(2):
    d, valid, _ = _differences(z1, z2, bimodal=bimodal)
    e = np.where(np.asarray(valid[c]), np.asarray(d[c]) / np.asarray(tau[:, c])[:, None],
                 -np.inf)
    ref_b.append(e.max(1))
  np.testing.assert_allclose(new["b"][index], np.stack(ref_b, 1), rtol=1e-5, atol=1e-5)
  # With γ < 1 the estimator differs (it carries the moving average).
  gz1_ma, _ = _grad(z1, z2, index, _random_state(8, seed=3), bimodal=bimodal, gamma=0.5)
  assert not np.allclose(gz1_ma, rz1, rtol=1e-3, atol=1e-5)


def test_temperatures_stay_in_bounds_under_extreme_gradients():
  z1, z2 = _views()
  z1 = z1 * 1e3  # scale is irrelevant after normalisation
  index = np.arange(8)
  state = _random_state(8)
  state["tau"] = jnp.full((8, 2), 0.005)
  state["m"] = jnp.asarray(np.where(np.arange(16).reshape(8, 2) % 2, 1e4, -1e4), jnp.float32)
  for bimodal in (True, False):
    loss, (metrics, new) = _loss(z1, z2, index, state, bimodal=bimodal, eta=1e3, tau_min=0.005,
                                 tau_max=1.0)
    tau = np.asarray(new["tau"])
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(v)).all() for v in new.values())
    assert tau.min() >= 0.005 and tau.max() <= 1.0
    assert np.isclose(tau.min(), 0.005) and np.isclose(tau.max(), 1.0)  # both bounds hit
    # The clipped gradient keeps |Δm| ≤ β_u · 5 per step.
    delta = np.asarray(new["m"]) - 0.1 * np.asarray(state["m"])
    assert np.abs(delta).max() <= 0.9 * 5 + 1e-3


def test_equal_similarities_give_zero_surrogate_but_nonzero_gradient():
  d = 6
  x = jnp.tile(jax.nn.one_hot(0, d), (4, 1))
  ortho = jnp.eye(d)[1:5]  # distinct directions orthogonal to e_0, equal norms
  y = x + 0.7 * ortho  # every image-text similarity equals 1/sqrt(1.49)
  index = np.arange(4)
  state = isogclr.init_state(4)
  for include_self in (False, True):
    loss, (metrics, _) = _loss(x, y, index, state, bimodal=True, include_self=include_self)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    assert np.isfinite(float(metrics["objective_1"]))
  gx, _ = _grad(x, y, index, state, bimodal=True)
  assert np.abs(np.asarray(gx)).max() > 1e-2
  z = jnp.ones((4, d))
  loss, _ = _loss(z, z, index, state, bimodal=False)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_only_the_batch_rows_of_the_state_change():
  z1, z2 = _views()
  index = np.array([17, 3, 25, 9, 0, 29, 12, 21])
  state = _random_state(30)
  for bimodal in (True, False):
    _, (_, new) = _loss(z1, z2, index, state, bimodal=bimodal)
    others = np.setdiff1d(np.arange(30), index)
    for name in ("u", "b", "tau", "m"):
      np.testing.assert_array_equal(np.asarray(new[name])[others],
                                    np.asarray(state[name])[others], err_msg=name)
      if name != "b":  # b only moves when a batch exceeds the running max
        assert not np.isclose(np.asarray(new[name])[index], np.asarray(state[name])[index]).any()


def test_negative_counts():
  z1, z2 = _views()
  big_b = 8
  for bimodal, include_self, per_row, n in [(True, False, big_b - 1, big_b - 1),
                                            (True, True, big_b, big_b - 1),
                                            (False, False, 2 * big_b - 2, 2 * big_b - 2),
                                            (False, True, 2 * big_b - 1, 2 * big_b - 2)]:
    dd, valid, num_neg = _differences(z1, z2, bimodal=bimodal, include_self=include_self)
    assert num_neg == n
    assert dd.shape == (2, big_b, big_b if bimodal else 2 * big_b)
    np.testing.assert_array_equal(np.asarray(valid).sum(2), per_row)
    # Positives have d = 0; the anchor itself is never a candidate.
    pos = np.isclose(np.asarray(dd), 0.0, atol=1e-6)
    assert pos.sum() >= 2 * big_b
    if not bimodal:
      assert not np.asarray(valid)[0, np.arange(big_b), np.arange(big_b)].any()
      assert not np.asarray(valid)[1, np.arange(big_b), big_b + np.arange(big_b)].any()


@pytest.mark.parametrize("bimodal", [True, False])
def test_eight_devices_match_one_device(bimodal):
  z1, z2 = _views(b=16, d=6, seed=4)
  index = jax.random.permutation(jax.random.key(5), 40)[:16]
  state = _random_state(40, seed=6)

  def fn(z1, z2, index, state, axis_name=None):
    f = lambda a, b: isogclr.isogclr_loss(a, b, index, state, bimodal=bimodal,
                                          axis_name=axis_name)
    (loss, (metrics, new)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z1, z2)
    return loss, metrics, new, grads

  ref = jax.jit(fn)(z1, z2, index, state)
  mesh = parallel.make_mesh(8)
  mapped = jax.jit(jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh,
                                 in_specs=(P("data"), P("data"), P("data"), P()),
                                 out_specs=(P(), P(), P(), (P("data"), P("data")))))
  sh = parallel.batch_sharding(mesh)
  out = mapped(jax.device_put(z1, sh), jax.device_put(z2, sh), jax.device_put(index, sh), state)
  loss, metrics, new, grads = out
  np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
  for name in ref[1]:
    np.testing.assert_allclose(metrics[name], ref[1][name], rtol=1e-5, atol=1e-7, err_msg=name)
  for name in ref[2]:
    np.testing.assert_allclose(new[name], ref[2][name], rtol=1e-5, atol=1e-7, err_msg=name)
    shards = [np.asarray(s.data) for s in new[name].addressable_shards]
    assert all(np.array_equal(s, shards[0]) for s in shards)
  for g, r in zip(grads, ref[3]):
    assert np.abs(np.asarray(r)).max() > 1e-3
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)

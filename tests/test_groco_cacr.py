"""GroCo (losses/groco.py) and CACR (losses/cacr.py): the sorting network's hard limit and a
scalar-loop numpy reference, closed forms and limits, stop-gradient wiring, 8-device parity."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import cacr, groco

# Jitted once per static setting (eager dispatch of the small ops costs more than compiling).
groco_loss = jax.jit(groco.groco_loss, static_argnames=(
    "num_negatives", "num_pos_views", "dist", "stop_gradient", "axis_name"))
cacr_loss = jax.jit(cacr.cacr_loss, static_argnames=("stop_gradient_weights", "axis_name"))
diffsort_oddeven = jax.jit(groco.diffsort_oddeven, static_argnames=("dist",))


def _views(b=8, v=2, d=8, seed=0, noise=0.5):
  k1, k2 = jax.random.split(jax.random.key(seed))
  base = jax.random.normal(k1, (b, 1, d))
  return base + noise * jax.random.normal(k2, (b, v, d))


def _normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _cdf(v, dist):
  return math.atan(v) / math.pi + 0.5 if dist == "cauchy" else 1.0 / (1.0 + math.exp(-v))


def _np_diffsort(x, beta, dist="cauchy"):
  """diffsort's odd-even network, one comparator at a time, float64 (rows: inputs)."""
  x = np.array(x, np.float64)
  n = len(x)
  perm = np.eye(n)
  for layer in range(n):
    for j in range(layer % 2, n - 1, 2):
      u, w = x[j], x[j + 1]
      a = _cdf(beta * (w - u), dist)
      x[j], x[j + 1] = a * u + (1 - a) * w, (1 - a) * u + a * w
      lo, hi = perm[:, j].copy(), perm[:, j + 1].copy()
      perm[:, j], perm[:, j + 1] = a * lo + (1 - a) * hi, (1 - a) * lo + a * hi
  return x, perm


def _np_groco(z, k, beta, num_pos=None, dist="cauchy"):
  """GroCo written from METHODS §1.12 on the full batch, float64."""
  h = _normalize(z)
  b, v, _ = h.shape
  num_pos = v if num_pos is None else num_pos
  log = lambda p: max(math.log(p), -100.0) if p > 0 else -100.0
  per_view = []
  for a in range(v):
    terms = []
    for i in range(b):
      pos = sorted(h[i, a] @ h[i, p] for p in range(num_pos) if p != a)
      neg = sorted(h[i, a] @ h[j, a] for j in range(b) if j != i)[-k:]
      _, perm = _np_diffsort(neg + pos, beta, dist)
      q_neg = np.clip(perm[:, :k].sum(1), 0, 1)
      q_pos = np.clip(perm[:, k:].sum(1), 0, 1)
      n = len(neg) + len(pos)
      bce_pos = [-(log(q_pos[r]) if r >= k else log(1 - q_pos[r])) for r in range(n)]
      bce_neg = [-(log(q_neg[r]) if r < k else log(1 - q_neg[r])) for r in range(n)]
      terms.append(0.5 * (np.mean(bce_pos) + np.mean(bce_neg)))
    per_view.append(np.mean(terms))
  return float(np.mean(per_view))


# ------------------------------------------------------------------------ sorting network


@pytest.mark.parametrize("n", [6, 7])
def test_diffsort_hard_limit_scalar_reference_and_double_stochasticity(n):
  rng = np.random.default_rng(n)
  distinct = rng.permutation(np.arange(n) * 0.1 - 0.3)  # gaps ≥ 0.1
  x = np.stack([distinct, rng.normal(size=n), np.full(n, 0.3)])  # the last row: all ties
  ranks = np.argsort(np.argsort(distinct))
  for dist, beta in (("cauchy", 1e7), ("logistic", 1e4)):
    out, perm = diffsort_oddeven(jnp.asarray(x, jnp.float32), beta, dist)
    np.testing.assert_allclose(out[0], np.sort(distinct), atol=1e-5)
    np.testing.assert_allclose(perm[0], np.eye(n)[ranks], atol=1e-5)  # input r -> its rank
  for dist in ("cauchy", "logistic"):
    out, perm = diffsort_oddeven(jnp.asarray(x, jnp.float32), 1.0, dist)
    for row in range(3):
      ref_out, ref_perm = _np_diffsort(x[row], 1.0, dist)
      np.testing.assert_allclose(out[row], ref_out, atol=1e-6)
      np.testing.assert_allclose(perm[row], ref_perm, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("sr,src->sc", x, perm), atol=1e-6)
    np.testing.assert_allclose(perm.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(perm.sum(2), 1.0, atol=1e-6)
    assert np.all(np.asarray(perm) >= 0) and np.all(np.asarray(perm) <= 1)
    assert np.abs(np.asarray(perm[0]) - np.eye(n)[ranks]).max() > 0.2  # soft at β = 1


# ------------------------------------------------------------------------------- GroCo


def test_groco_one_negative_one_positive_closed_form():
  # n = 2: one comparator, P = [[α, 1−α], [1−α, α]] and the loss is −log α per anchor, with
  # α = ½ + arctan(β (s⁺ − max_j s⁻)) / π.
  z = _views(seed=1)
  h = _normalize(z)
  for beta in (1.0, 3.0):
    terms = []
    for a in range(2):
      sim = h[:, a] @ h[:, a].T
      np.fill_diagonal(sim, -np.inf)
      pos = np.sum(h[:, a] * h[:, 1 - a], axis=1)
      terms.append(-np.log(0.5 + np.arctan(beta * (pos - sim.max(1))) / np.pi))
    loss, _ = groco_loss(z, num_negatives=1, steepness=beta)
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  same = jnp.ones((8, 2, 8))  # all similarities equal: α = ½, loss log 2
  np.testing.assert_allclose(groco_loss(same, num_negatives=1)[0], math.log(2), rtol=1e-6)


def test_groco_matches_numpy_reference_with_an_anchor_only_view():
  z = _views(v=3, seed=2)  # views 0, 1 positives; view 2 (a "local crop") is an anchor only
  for num_pos, k in ((2, 3), (3, 5)):
    loss, metrics = groco_loss(z, num_negatives=k, steepness=2.0, num_pos_views=num_pos)
    np.testing.assert_allclose(loss, _np_groco(z, k, 2.0, num_pos), rtol=1e-5)
  h = _normalize(z)
  pos = np.sort(np.stack([np.sum(h[:, 0] * h[:, p], 1) for p in (1, 2)], 1), 1)
  np.testing.assert_allclose(metrics["pos_min"], pos[:, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["pos_max"], pos[:, 1].mean(), rtol=1e-5)


def test_groco_separated_groups_cost_nothing_and_inverted_groups_cost_much():
  e = jnp.eye(8)
  z = jnp.stack([e, e], axis=1)  # s⁺ = 1, s⁻ = 0 for every anchor
  loss_sharp, metrics = groco_loss(z, num_negatives=4, steepness=1e4)
  assert float(loss_sharp) < 1e-3
  loss_soft, _ = groco_loss(z, num_negatives=4, steepness=1.0)
  assert float(loss_soft) > 0.05
  assert float(metrics["sorted_acc"]) == 1.0 and float(metrics["pos_neg_gap"]) == 1.0
  inverted = jnp.stack([e, -e], axis=1)  # s⁺ = −1 < s⁻ = 0: every positive ranks last
  loss_bad, metrics = groco_loss(inverted, num_negatives=4, steepness=1e4)
  assert float(loss_bad) > 1.0  # Cauchy tails: q⁺ ≈ 1/(πβ), not 0
  assert float(metrics["sorted_acc"]) == 0.0


def test_groco_gradient_reaches_the_anchor_only():
  z = _views(v=2, seed=3)
  kw = dict(num_negatives=3, steepness=2.0)
  grad_sg = jax.jit(jax.grad(lambda z: groco_loss(z, **kw)[0]))(z)
  const = jax.lax.stop_gradient(z)

  def frozen(z):  # positives and negatives read from a constant copy of the batch
    cols = jnp.arange(z.shape[0])
    rows = [groco.group_order_bce(
        groco.anchor_similarities(z[:, a], const[:, [1 - a]], const[:, a], 3, cols), 3,
        steepness=2.0) for a in range(2)]
    return jnp.mean(jnp.stack(rows))

  np.testing.assert_allclose(grad_sg, jax.jit(jax.grad(frozen))(z), rtol=1e-5, atol=1e-7)
  grad_full = jax.jit(jax.grad(lambda z: groco_loss(z, stop_gradient=False, **kw)[0]))(z)
  assert float(jnp.max(jnp.abs(grad_full - grad_sg))) > 1e-4
  with pytest.raises(ValueError, match="num_negatives"):
    groco_loss(z, num_negatives=8)


# -------------------------------------------------------------------------------- CACR


def _np_cacr(z, alpha, beta, t_pos, t_neg):
  """The reference's loops (attraction over each query view, repulsion over view pairs
  x < y), float64, on normalised embeddings."""
  h = _normalize(z)
  b, v, _ = h.shape
  softmax = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(
      a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  ca = 0.0
  for x in range(v):
    others = [m for m in range(v) if m != x]
    cost = alpha * np.stack([np.sum((h[:, x] - h[:, m]) ** 2, -1) for m in others], 1)
    ca += np.mean(np.sum(cost * softmax(cost * t_pos / alpha), 1))
  cr, pairs = 0.0, 0
  off = ~np.eye(b, dtype=bool)
  for x in range(v):
    for y in range(x + 1, v):
      cost = -beta * np.sum((h[:, x, None] - h[None, :, y]) ** 2, -1)[off].reshape(b, b - 1)
      cr += np.mean(np.sum(cost * softmax(cost * t_neg / beta), 1))
      pairs += 1
  return ca / v, cr / pairs


def test_cacr_matches_the_reference_loops():
  z = _views(v=3, seed=4)
  ca, cr = _np_cacr(z, 1.3, 0.7, 1.0, 0.9)
  for flag in (True, False):
    loss, metrics = cacr_loss(z, alpha=1.3, beta=0.7, t_pos=1.0, t_neg=0.9,
                                   stop_gradient_weights=flag)
    np.testing.assert_allclose(loss, ca + cr, rtol=1e-5)
    np.testing.assert_allclose([metrics["ca"], metrics["cr"]], [ca, cr], rtol=1e-5)


def test_cacr_uniform_weights_closed_form():
  # t⁺ = t⁻ = 0: mean positive distance, and for unit vectors
  # Σ_{i≠j} ‖x_i − y_j‖² = 2B² − 2 (Σ_i x_i)·(Σ_j y_j) − Σ_i ‖x_i − y_i‖².
  z = _views(b=8, v=3, seed=5)
  h = _normalize(z)
  b, v = h.shape[:2]
  pos = [np.sum((h[:, x] - h[:, m]) ** 2, -1) for x in range(v) for m in range(v) if m != x]
  neg = [(2 * b * b - 2 * h[:, x].sum(0) @ h[:, y].sum(0)
          - np.sum((h[:, x] - h[:, y]) ** 2)) / (b * (b - 1))
         for x in range(v) for y in range(x + 1, v)]
  loss, metrics = cacr_loss(z, alpha=2.0, beta=0.5, t_pos=0.0, t_neg=0.0)
  np.testing.assert_allclose(metrics["ca"], 2.0 * np.mean(pos), rtol=1e-5)
  np.testing.assert_allclose(metrics["cr"], -0.5 * np.mean(neg), rtol=1e-5)
  np.testing.assert_allclose(metrics["ca"], 2.0 * metrics["pos_cost"], rtol=1e-5)
  np.testing.assert_allclose(metrics["cr"], -0.5 * metrics["neg_cost"], rtol=1e-5)
  np.testing.assert_allclose(loss, 2.0 * np.mean(pos) - 0.5 * np.mean(neg), atol=1e-6)
  # Conditional weights move both terms away from the uniform means.
  _, weighted = cacr_loss(z, alpha=2.0, beta=0.5, t_pos=1.0, t_neg=2.0)
  assert weighted["ca"] > metrics["ca"] + 1e-4  # farther positives weigh more
  assert weighted["cr"] > metrics["cr"] + 1e-4  # closer negatives weigh more


def test_cacr_limits_two_views_and_hard_temperatures():
  z2 = _views(v=2, seed=6)
  cas = [cacr_loss(z2, t_pos=t)[1]["ca"] for t in (0.0, 1.0, 5.0)]
  np.testing.assert_allclose(cas, cas[0], rtol=1e-6)  # one positive: its weight is 1
  z = _views(v=3, seed=7)
  h = _normalize(z)
  pos = np.stack([[np.sum((h[:, x] - h[:, m]) ** 2, -1) for m in range(3) if m != x]
                  for x in range(3)])  # [V, V − 1, B]
  _, metrics = cacr_loss(z, t_pos=1e4, t_neg=1e4)
  np.testing.assert_allclose(metrics["ca"], pos.max(1).mean(), rtol=1e-4)  # farthest positive
  np.testing.assert_allclose(metrics["cr"], -metrics["neg_cost_min"], rtol=1e-4)  # nearest neg


def test_cacr_stop_gradient_weights_freezes_the_conditional_distributions():
  z = _views(v=3, seed=8)
  kw = dict(alpha=1.0, beta=1.0, t_pos=1.0, t_neg=2.0)
  grad_sg = jax.jit(jax.grad(lambda z: cacr_loss(z, **kw)[0]))(z)
  grad_full = jax.jit(jax.grad(
      lambda z: cacr_loss(z, stop_gradient_weights=False, **kw)[0]))(z)
  assert float(jnp.max(jnp.abs(grad_full - grad_sg))) > 1e-4

  h = _normalize(z)
  soft = lambda a: np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  pairs = [(x, y) for x in range(3) for y in range(x + 1, 3)]
  off = ~np.eye(8, dtype=bool)
  w_pos = soft(np.sum((h[:, :, None] - h[:, None]) ** 2, -1) * kw["t_pos"]
               - 1e9 * np.eye(3))  # [B, V, V]
  w_neg = [soft(-kw["t_neg"] * np.sum((h[:, x, None] - h[None, :, y]) ** 2, -1) - 1e9 * ~off)
           for x, y in pairs]

  def frozen(z):
    u = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    ca = jnp.sum(w_pos * jnp.sum((u[:, :, None] - u[:, None]) ** 2, -1)) / (8 * 3)
    cr = sum(jnp.sum(w * jnp.sum((u[:, x, None] - u[None, :, y]) ** 2, -1))
             for w, (x, y) in zip(w_neg, pairs)) / (8 * len(pairs))
    return ca - cr

  np.testing.assert_allclose(grad_sg, jax.jit(jax.grad(frozen))(z), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ 8-device parity


def _sharded(loss_fn, z, num_devices=8):
  mesh = parallel.make_mesh(num_devices)

  def local(z):
    (loss, metrics), grads = jax.value_and_grad(
        lambda z: loss_fn(z, axis_name="data"), has_aux=True)(z)
    return loss, metrics, grads

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"),
                             out_specs=(P(), P(), P("data"))))
  return fn(jax.device_put(z, parallel.batch_sharding(mesh)))


@pytest.mark.parametrize("name,loss_fn", [
    ("groco", functools.partial(groco.groco_loss, num_negatives=5, steepness=2.0)),
    ("cacr", functools.partial(cacr.cacr_loss, alpha=1.0, beta=1.0, t_pos=1.0, t_neg=2.0)),
])
def test_eight_devices_match_one_device_values_metrics_and_gradients(name, loss_fn):
  z = _views(b=16, v=2 if name == "groco" else 3, seed=9)
  flag = "stop_gradient" if name == "groco" else "stop_gradient_weights"
  for stop in (True, False):
    fn = functools.partial(loss_fn, **{flag: stop})
    (ref, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(z)
    loss, metrics, grads = _sharded(fn, z)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for k in ref_metrics:
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(ref_grads))) > 1e-3
  if name == "groco":
    np.testing.assert_allclose(ref, _np_groco(z, 5, 2.0), rtol=1e-5)

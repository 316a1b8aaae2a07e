"""MLCD, BECLR (+ DyCE memory) and SBCL losses: closed forms and numpy references, 8-device
value and gradient parity, DyCE FIFO / clustering identical across devices, and the
objectives' state keeping its shapes and dtypes from step to step."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from contrastive_jax import parallel
from contrastive_jax.losses import beclr, mlcd, sbcl


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sharded(local_fn, args, specs, out_specs, num_devices=8):
  """``jit(shard_map(local_fn))`` on ``num_devices``; ``P('data')`` arguments are sharded."""
  mesh = parallel.make_mesh(num_devices)
  fn = jax.jit(jax.shard_map(local_fn, mesh=mesh, in_specs=specs, out_specs=out_specs))
  sharding = parallel.batch_sharding(mesh)
  placed = [jax.device_put(a, sharding) if s == P("data") else a for a, s in zip(args, specs)]
  return fn(*placed)


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


# --- MLCD ------------------------------------------------------------------------------------

def test_mlcd_closed_forms_and_numpy_reference():
  k = 12
  pos = np.zeros((4, k), bool)
  pos[0, [1, 2]] = pos[1, 5] = pos[2, [0, 3, 7]] = True  # row 3: no positive
  valid = np.ones(k, bool)
  valid[[4, 9]] = False
  # All scores 0: log(1 + |Ω⁺|) + log(1 + |Ω⁻|) per row.
  loss, metrics = mlcd.multilabel_pos_neg_loss(jnp.zeros((4, k)), pos, valid)
  n_pos = pos.sum(1)
  n_neg = (valid[None] & ~pos).sum(1)
  np.testing.assert_allclose(loss, np.mean(np.log1p(n_pos) + np.log1p(n_neg)), rtol=1e-6)
  np.testing.assert_allclose(metrics["num_positives"], n_pos.mean())
  # Random scores against the formula.
  s = 4.0 * np.asarray(_normal(0, (4, k)))
  want = np.mean([np.log1p(np.exp(-s[i][pos[i]]).sum())
                  + np.log1p(np.exp(s[i][valid & ~pos[i]]).sum()) for i in range(4)])
  loss, _ = mlcd.multilabel_pos_neg_loss(s, pos, valid)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # One positive: softplus(−c_pos) + log(1 + Σ_neg e^c); large scores stay finite.
  one = np.zeros((1, k), bool)
  one[0, 3] = True
  loss, _ = mlcd.multilabel_pos_neg_loss(100.0 * s[:1], one)
  c = 100.0 * s[0]
  want = np.logaddexp(0, -c[3]) + np.logaddexp.reduce(np.r_[0.0, np.delete(c, 3)])
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_mlcd_labels_routing_and_class_sampling():
  feats, centres = _normal(1, (6, 8)), _normal(2, (16, 8))
  labels = mlcd.nearest_centres(feats, centres, 3)
  cos = _unit(feats) @ _unit(centres).T
  np.testing.assert_array_equal(labels, np.argsort(-cos, axis=1)[:, :3])
  full = np.asarray(mlcd.label_mask(labels, 16))
  assert full.sum() == 18 and all(full[i, labels[i]].all() for i in range(6))
  # Padding (−1) is ignored; sampled classes hold every positive and about ratio of the rest.
  padded = labels.at[:, 2].set(-1)
  assert np.asarray(mlcd.label_mask(padded, 16)).sum() == 12
  keep = np.asarray(mlcd.sample_classes(jax.random.key(3), labels, 16, 0.25))
  assert keep[np.asarray(labels).ravel()].all() and keep.sum() < 16


def test_mlcd_on_8_devices_rows_and_class_shards_match_one_device():
  x, w = _normal(4, (16, 8)), _normal(5, (16, 8))
  labels = mlcd.nearest_centres(x + 0.5 * _normal(6, (16, 8)), w, 3)
  class_mask = mlcd.sample_classes(jax.random.key(7), labels, 16, 0.5)
  kw = dict(scale=8.0, margin=0.15, class_mask=class_mask)
  grad = lambda x, lab, w, **k: jax.value_and_grad(
      lambda x, w: mlcd.mlcd_loss(x, w, lab, **kw, **k), argnums=(0, 1), has_aux=True)(x, w)
  want = grad(x, labels, w)
  for shard_classes in (False, True):
    got = _sharded(lambda x, lab, w: grad(x, lab, w, shard_classes=shard_classes,
                                          axis_name="data"),
                   (x, labels, w), (P("data"), P("data"), P()),
                   ((P(), P()), (P("data"), P())))
    _assert_tree_close(got, want)


# --- BECLR -----------------------------------------------------------------------------------

def _numpy_beclr(p1, p2, t1, t2, s1, s2, lam, tau):
  p1, p2, t1, t2, s1, s2 = map(_unit, (p1, p2, t1, t2, s1, s2))
  pos = -0.5 * (np.mean(np.sum(p1 * t2, 1)) + np.mean(np.sum(p2 * t1, 1)))
  e = np.concatenate([s1, s2])
  n2 = len(e)
  b = n2 // 2
  s = [sum(np.exp(e[r] @ e[j] / tau) for j in range(n2) if j not in (r, (r + b) % n2))
       for r in range(n2)]
  return pos + lam * np.log(np.mean(s) / (n2 - 2))


def test_beclr_uniformity_closed_form_and_numpy_reference():
  same = jnp.tile(_normal(0, (1, 6)), (10, 1))
  for tau in (2.0, 0.5, 0.05):  # identical rows: L_neg = 1/τ_u exactly (no overflow at 0.05)
    np.testing.assert_allclose(beclr.uniformity_loss(same, same, tau), 1.0 / tau, rtol=1e-5)
  args = [_normal(i, (6, 5)) for i in range(6)]
  loss, metrics = beclr.beclr_loss(*args, neg_weight=0.3, temperature=0.7)
  np.testing.assert_allclose(loss, _numpy_beclr(*args, 0.3, 0.7), rtol=1e-5)
  t = _unit(np.concatenate(args[2:4]))
  np.testing.assert_allclose(metrics["std"], np.std(t, axis=0, ddof=1).mean(), rtol=1e-5)


def test_beclr_on_8_devices_matches_one_device():
  args = [_normal(10 + i, (16, 8)) for i in range(6)]
  grad = lambda *a, **k: jax.value_and_grad(
      lambda *a: beclr.beclr_loss(*a, **k), argnums=tuple(range(6)), has_aux=True)(*a)
  want = grad(*args)
  got = _sharded(lambda *a: grad(*a, axis_name="data"), args, (P("data"),) * 6,
                 ((P(), P()), (P("data"),) * 6))
  _assert_tree_close(got, want, atol=1e-5)  # L_neg ≈ 0 here: a log of a sum near 1
  # Teacher rows are stop-gradient targets.
  assert not np.any(want[1][2]) and not np.any(want[1][3])


def _dyce_steps(mem, batches, axis_name=None):
  """``dyce_update`` over ``batches [T, b, D]`` (one scan); returns every step's memory."""
  def step(s, x):
    s = beclr.dyce_update(s, x, key=jax.random.key(0), epsilon=0.1, axis_name=axis_name)
    return s, s
  return jax.lax.scan(step, mem, batches)[1]


def test_dyce_fifo_then_clustering_identical_on_8_devices():
  mem = beclr.dyce_init(48, 4, 4)
  batches = _normal(20, (5, 16, 4))
  states = jax.jit(_dyce_steps)(mem, batches)
  at = lambda t: jax.tree.map(lambda a: a[t], states)
  # FIFO before the first clustering: rows in order, count saturates, labels −1.
  np.testing.assert_allclose(at(1)["bank"][:32], _unit(batches[:2].reshape(32, 4)),
                             rtol=1e-5, atol=1e-6)
  assert int(at(1)["ptr"]) == 32 and int(at(2)["count"]) == 48
  assert int(at(2)["clustered"]) == 0 and (np.asarray(at(2)["labels"]) == -1).all()
  # Full after step 3: clustered, then the batch is OT-assigned and written at ptr 0.
  assert int(at(3)["clustered"]) == 1 and int(at(3)["ptr"]) == 16
  np.testing.assert_allclose(at(3)["bank"][:16], _unit(batches[3]), rtol=1e-5, atol=1e-6)
  assert (np.asarray(at(3)["labels"]) >= 0).all()
  bank, labels = np.asarray(at(4)["bank"]), np.asarray(at(4)["labels"])
  for k in range(4):  # centroids are the means of their memory rows (μ = 0)
    if (labels == k).any():
      np.testing.assert_allclose(at(4)["centroids"][k], bank[labels == k].mean(0),
                                 rtol=1e-5, atol=1e-6)
  # 8 devices (batch rows sharded): the same memories, replicated, at every step.
  got = _sharded(lambda x: _dyce_steps(mem, jnp.moveaxis(x, 0, 1), "data"),
                 (jnp.moveaxis(batches, 0, 1),), (P("data"),), P())
  _assert_tree_close(got, states)


def test_dyce_assignment_is_balanced_and_prefers_near_centroids():
  # Rows equal to the centroids (a plan ∝ exp(+distance/ε) would send each to a far one).
  centroids = _unit(np.eye(4, 6))
  mem = dict(beclr.dyce_init(8, 6, 4), centroids=jnp.asarray(centroids, jnp.float32),
             clustered=jnp.ones((), jnp.int32))
  rows = np.repeat(centroids, 2, axis=0) + 0.01 * np.asarray(_normal(0, (8, 6)))
  out = beclr.dyce_update(mem, rows, key=jax.random.key(0), epsilon=0.05)
  np.testing.assert_array_equal(out["labels"], np.repeat(np.arange(4), 2))
  # Everything near one centroid: the converged plan (small ε) spreads the batch evenly.
  crowd = np.tile(centroids[:1], (8, 1)) + 0.05 * np.asarray(_normal(1, (8, 6)))
  out = beclr.dyce_update(mem, crowd, key=jax.random.key(0), epsilon=0.01,
                          sinkhorn_iterations=100)
  np.testing.assert_array_equal(np.bincount(np.asarray(out["labels"]), minlength=4), 2)
  # Neighbours come from the query's nearest cluster, most similar first.
  nbrs = np.asarray(beclr.dyce_neighbours(out, crowd[:3], 2))
  assert nbrs.shape == (3, 2, 6)
  near = np.argmax(_unit(crowd[:3]) @ _unit(out["centroids"]).T, axis=1)
  bank, labels = np.asarray(out["bank"]), np.asarray(out["labels"])
  for i in range(3):
    members = bank[labels == near[i]]
    order = np.argsort(-(members @ _unit(crowd[i])))
    np.testing.assert_allclose(nbrs[i], members[order[:2]], rtol=1e-6)


# --- SBCL ------------------------------------------------------------------------------------

def _numpy_sbcl(z1, z2, labels, subs, tau1, tau2, gamma, w_sub):
  z = np.concatenate([_unit(z1), _unit(z2)])
  lab, sub = np.tile(labels, 2), np.tile(subs, 2)
  n, b = len(z), len(z1)
  tau2 = np.broadcast_to(np.asarray(tau2, np.float64), (int(lab.max()) + 1,))
  l_sub, l_cls = [], []
  for r in range(n):
    partner = (r + b) % n
    others = [j for j in range(n) if j != r]
    lse = np.log(sum(np.exp(z[r] @ z[j] / tau1) for j in others))
    pos = [j for j in others if sub[j] == sub[r]]
    l_sub.append(-np.mean([z[r] @ z[j] / tau1 - lse for j in pos]))
    t = tau2[lab[r]]
    cand = [j for j in range(n) if j == partner or sub[j] != sub[r]]
    lse = np.log(sum(np.exp(z[r] @ z[j] / t) for j in cand))
    pos = [j for j in cand if j == partner or lab[j] == lab[r]]
    l_cls.append(-np.mean([z[r] @ z[j] / t - lse for j in pos]))
  return w_sub * np.mean(l_sub) + gamma * np.mean(l_cls), np.mean(l_sub), np.mean(l_cls)


def test_sbcl_numpy_reference_and_one_subclass_reduction():
  z1, z2 = _normal(0, (8, 5)), _normal(1, (8, 5))
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  subs = np.array([0, 0, 1, 4, 4, 8, 9, 9])  # S = 4: class c owns ids 4c .. 4c+3
  tau2 = np.array([0.12, 0.3, 0.2])
  loss, metrics = sbcl.sbcl_loss(z1, z2, labels, subs, temperature=0.1,
                                 class_temperature=tau2, class_weight=0.2, subclass_weight=1.5)
  want, want_sub, want_cls = _numpy_sbcl(z1, z2, labels, subs, 0.1, tau2, 0.2, 1.5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["subclass_loss"], want_sub, rtol=1e-5)
  np.testing.assert_allclose(metrics["class_loss"], want_cls, rtol=1e-5)
  # One subclass per class: the subclass term is SupCon over the classes.
  _, metrics = sbcl.sbcl_loss(z1, z2, labels, labels * 4, temperature=0.1)
  z = np.concatenate([_unit(z1), _unit(z2)])
  lab = np.tile(labels, 2)
  logits = z @ z.T / 0.1
  np.fill_diagonal(logits, -np.inf)
  log_prob = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  pos = (lab[:, None] == lab[None]) & ~np.eye(16, dtype=bool)
  supcon = -np.mean([log_prob[r][pos[r]].mean() for r in range(16)])
  np.testing.assert_allclose(metrics["subclass_loss"], supcon, rtol=1e-5)
  assert float(metrics["class_positives"]) == 1.0  # only the other view


def test_sbcl_on_8_devices_matches_one_device():
  z1, z2 = _normal(2, (16, 8)), _normal(3, (16, 8))
  labels = jnp.arange(16) % 3
  subs = labels * 4 + (jnp.arange(16) // 3) % 2
  tau2 = jnp.array([0.12, 0.2, 0.15])
  grad = lambda z1, z2, lab, sub, **k: jax.value_and_grad(
      lambda a, b: sbcl.sbcl_loss(a, b, lab, sub, class_temperature=tau2, **k),
      argnums=(0, 1), has_aux=True)(z1, z2)
  want = grad(z1, z2, labels, subs)
  got = _sharded(lambda *a: grad(*a, axis_name="data"), (z1, z2, labels, subs),
                 (P("data"),) * 4, ((P(), P()), (P("data"), P("data"))))
  _assert_tree_close(got, want)


def test_sbcl_subclass_counts_and_per_class_kmeans():
  labels = jnp.array([0] * 20 + [1] * 12 + [2] * 8 + [-1] * 4)
  # Reference rule: size = max(min n_c, 10) = 10 -> 20 // 10, 12 // 10, max(8 // 10, 1); absent 0.
  np.testing.assert_array_equal(sbcl.subclass_counts(labels, 4, 4), [2, 1, 1, 0])
  np.testing.assert_array_equal(sbcl.subclass_counts(labels, 4, 3, size=4), [3, 3, 2, 0])
  counts = sbcl.subclass_counts(labels, 4, 3, size=4)
  feats = _normal(5, (44, 6))
  centroids, sub = sbcl.class_kmeans(jax.random.key(0), feats, labels, counts, 3, iterations=4)
  sub, lab = np.asarray(sub), np.asarray(labels)
  assert (sub[lab < 0] == -1).all()
  assert (sub[lab >= 0] // 3 == lab[lab >= 0]).all()  # nested in the row's own class
  assert ((sub[lab >= 0] % 3) < np.asarray(counts)[lab[lab >= 0]]).all()  # active slots only
  np.testing.assert_allclose(np.linalg.norm(centroids[0, :3], axis=-1), 1.0, rtol=1e-5)
  # The rows' ids are their nearest own-class centroid.
  np.testing.assert_array_equal(sbcl.nearest_subclass(feats, labels, centroids, counts), sub)


# --- objectives: state keeps its shapes and dtypes --------------------------------------------

@pytest.mark.parametrize("name", ["mlcd_shapes", "beclr_shapes", "sbcl_shapes"])
def test_objective_state_keeps_shapes(name):
  from contrastive_jax import train
  config = tiny_config(name)
  _, objective, _, _ = train.build(config)
  b = config.batch_size
  size = config.data.views.ssl.size
  batch = {"views": jnp.zeros((b, 2, size, size, 3)), "label": jnp.arange(b) % 5}
  params, state = jax.eval_shape(objective.init, jax.random.key(0), batch)
  spec = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  _, (metrics, new_state) = jax.eval_shape(
      lambda p, s: objective.loss(p, s, batch, jax.random.key(1)), params, state)
  assert spec(new_state) == spec(state)
  assert all(m.shape == () for m in jax.tree.leaves(metrics))

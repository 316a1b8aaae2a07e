"""Sharded Lloyd's k-means (losses/kmeans.py): 8 shards == 1 device, recovery, empty clusters."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import kmeans as km


def _blobs(key, n_per=16, k=4, d=3, spread=0.3, sep=5.0):
  """``k`` Gaussian blobs around ``sep``-scaled random means, rows shuffled."""
  k1, k2, k3 = jax.random.split(key, 3)
  means = sep * jax.random.normal(k1, (k, d))
  labels = jnp.repeat(jnp.arange(k), n_per)
  x = means[labels] + spread * jax.random.normal(k2, (k * n_per, d))
  perm = jax.random.permutation(k3, k * n_per)
  return x[perm], labels[perm]


def _run(x, key, k, iterations, num_devices):
  """Init + k-means on ``num_devices`` shards (1: plain call)."""

  def fn(x, key, axis_name=None):
    init = km.init_centroids(key, x, k, axis_name=axis_name)
    c, a, m = km.kmeans(x, init, iterations=iterations, axis_name=axis_name)
    return init, c, a, m

  if num_devices == 1:
    return jax.jit(fn)(x, key)
  mesh = parallel.make_mesh(num_devices)
  mapped = jax.jit(jax.shard_map(lambda x, key: fn(x, key, "data"), mesh=mesh,
                                 in_specs=(P("data"), P()),
                                 out_specs=(P(), P(), P("data"), P())))
  return mapped(jax.device_put(x, parallel.batch_sharding(mesh)), key)


def test_eight_shards_equal_one_device():
  # Overlapping blobs: many points move between clusters over the iterations.
  x, _ = _blobs(jax.random.key(1), n_per=16, k=4, d=3, spread=1.5, sep=2.0)
  key = jax.random.key(7)
  init1, c1, a1, m1 = _run(x, key, 6, 8, 1)
  init8, c8, a8, m8 = _run(x, key, 6, 8, 8)
  np.testing.assert_array_equal(init8, init1)  # the same K global rows
  np.testing.assert_allclose(c8, c1, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(a8, a1)
  for name in m1:
    np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, err_msg=name)
  # The initial centroids are K distinct rows of the data.
  rows = {tuple(r) for r in np.asarray(x)}
  assert all(tuple(r) in rows for r in np.asarray(init1))
  assert len({tuple(r) for r in np.asarray(init1)}) == 6


def test_centroids_are_means_of_their_members_and_inertia_matches():
  x, _ = _blobs(jax.random.key(2), spread=1.0, sep=2.0)
  _, c, a, m = _run(x, jax.random.key(3), 5, 30, 1)
  x, c, a = map(np.asarray, (x, c, a))
  for k in range(5):
    if (a == k).any():  # converged: a fixed point of the Lloyd update
      np.testing.assert_allclose(c[k], x[a == k].mean(0), rtol=1e-5, atol=1e-6)
  d2 = ((x[:, None] - c[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(a, d2.argmin(1))
  np.testing.assert_allclose(m["inertia"], d2.min(1).mean(), rtol=1e-5)


def test_recovers_well_separated_clusters():
  x, labels = _blobs(jax.random.key(4), n_per=16, k=4, spread=0.1, sep=10.0)
  labels = np.asarray(labels)
  # One starting row per blob (Lloyd's step itself is under test, not the seeding).
  init = x[np.array([np.flatnonzero(labels == k)[0] for k in range(4)])]
  c, a, m = km.kmeans(x, init, iterations=5)
  np.testing.assert_array_equal(np.asarray(a), labels)  # init row k is in blob k
  for k in range(4):
    np.testing.assert_allclose(c[k], np.asarray(x)[labels == k].mean(0), rtol=1e-5, atol=1e-6)
  assert float(m["empty_clusters"]) == 0
  np.testing.assert_allclose(m["cluster_perplexity"], 4.0, rtol=1e-5)  # balanced


def test_empty_cluster_keeps_its_centroid_without_nan():
  x, labels = _blobs(jax.random.key(5), n_per=8, k=2, spread=0.1, sep=3.0)
  labels = np.asarray(labels)
  far = jnp.full((1, x.shape[1]), 1e3)
  init = jnp.concatenate([x[np.array([np.flatnonzero(labels == k)[0] for k in range(2)])], far])
  for num_devices in (1, 8):
    if num_devices == 1:
      c, a, m = km.kmeans(x, init, iterations=3)
    else:
      mesh = parallel.make_mesh(8)
      c, a, m = jax.jit(jax.shard_map(
          lambda x: km.kmeans(x, init, iterations=3, axis_name="data"), mesh=mesh,
          in_specs=P("data"), out_specs=(P(), P("data"), P())))(
              jax.device_put(x, parallel.batch_sharding(mesh)))
    assert np.isfinite(np.asarray(c)).all()
    np.testing.assert_array_equal(c[2], far[0])
    assert not (np.asarray(a) == 2).any()
    assert float(m["empty_clusters"]) == 1


def test_blocked_assignment_equals_unblocked():
  x, _ = _blobs(jax.random.key(6), spread=2.0, sep=1.0)
  c = x[:7] + 0.01
  a1, d1 = km.nearest_centroid(x, c)
  a2, d2 = km.nearest_centroid(x, c, block_size=8)
  np.testing.assert_array_equal(a2, a1)
  np.testing.assert_allclose(d2, d1, rtol=1e-6, atol=1e-6)
  ref = ((np.asarray(x)[:, None] - np.asarray(c)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(a1, ref.argmin(1))
  np.testing.assert_allclose(d1, ref.min(1), rtol=1e-4, atol=1e-5)


def test_invariant_gather_and_local_rows_round_trip():
  x = jnp.arange(32 * 3, dtype=jnp.float32).reshape(32, 3)
  mesh = parallel.make_mesh(8)

  def fn(x):
    full = km.gather_rows_invariant(x, "data")
    return full, km.local_rows(full, "data")

  full, back = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"),
                                     out_specs=(P(), P("data"))))(
                                         jax.device_put(x, parallel.batch_sharding(mesh)))
  np.testing.assert_array_equal(full, x)
  np.testing.assert_array_equal(back, x)

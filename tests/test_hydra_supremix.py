"""SupCon, SupReMix, Hydra: numpy references, reductions, closed forms, 8-device parity."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import clip, hydra, simclr, supcon, supremix

B, V, D = 16, 2, 8


def _jit(fn, **kw):
  """``fn`` jitted with its hyperparameters bound (eager dispatch is slow on CPU)."""
  return jax.jit(functools.partial(fn, **kw))


supcon_loss = lambda z, y, **kw: _jit(supcon.supcon_loss, **kw)(z, y)  # noqa: E731
supremix_loss = lambda z, y, **kw: _jit(supremix.supremix_loss, **kw)(z, y)  # noqa: E731
hydra_loss = lambda *a, **kw: _jit(hydra.hydra_loss, **kw)(*a)  # noqa: E731


def _views(b=B, d=D, seed=0):
  r = np.random.default_rng(seed)
  z1 = r.standard_normal((b, d))
  return jnp.asarray(np.stack([z1, z1 + 0.7 * r.standard_normal((b, d))], axis=1), jnp.float32)


def _normal(seed, shape):
  """Test inputs from numpy (each new shape of jax.random compiles a kernel)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _flat(z):
  """``[B, V, D]`` -> ``[V·B, D]`` view-major, and each row's example index."""
  z = _normalize(z)
  return np.concatenate([z[:, v] for v in range(z.shape[1])]), np.tile(np.arange(z.shape[0]),
                                                                       z.shape[1])


def _mix(u, v, lam):
  m = lam * u + (1 - lam) * v
  return m / np.linalg.norm(m)


def _numpy_supremix(z, y, tau, *, tol=0.0, hn=True, hp=True, lam=0.5, power=0.0, offset=0.0):
  """SupReMix written with explicit mixture vectors, anchor by anchor."""
  h, rows = _flat(z)
  y = np.asarray(y, np.float64)[rows]
  losses = []
  for i in range(len(h)):
    terms = []  # (logit, is_positive, label_distance)
    others = [j for j in range(len(h)) if j != i]
    for j in others:
      d = abs(y[j] - y[i])
      terms.append((h[i] @ h[j] / tau, d <= tol, d))
    below = [j for j in others if y[j] < y[i] - tol]
    above = [j for j in others if y[j] > y[i] + tol]
    for j in below + above:
      if hn and (1 - lam) * abs(y[j] - y[i]) > tol:
        terms.append((h[i] @ _mix(h[i], h[j], lam) / tau, False, (1 - lam) * abs(y[j] - y[i])))
      side = above if j in below else below
      if hp and side:
        key = [y[k] if j in above else -y[k] for k in side]
        k = side[int(np.argmax(key))]
        mu = (y[i] - y[k]) / (y[j] - y[k])
        terms.append((h[i] @ _mix(h[j], h[k], mu) / tau, True, 0.0))
    logits = np.array([t[0] for t in terms])
    pos = np.array([t[1] for t in terms])
    w = (np.array([t[2] for t in terms]) + 1.0) ** (-power)
    denom = np.log(np.sum(w * np.exp(logits)))
    if pos.any():
      losses.append(-np.sum(logits[pos] - denom) / (pos.sum() + offset))
  return np.mean(losses)


def _numpy_hydra(z1, z2, g, y, y2, s):
  a = _normalize(z1) * np.asarray(g, np.float64) ** 2
  logits = s * a @ _normalize(z2).T
  total, count = 0.0, 0
  for i in range(len(y)):
    negs = [n for n in range(len(y)) if y[n] not in (y[i], y2[i])]
    for p in range(len(y)):
      if y[p] == y2[i]:
        total += np.logaddexp(logits[i, p], np.log(np.sum(np.exp(logits[i, negs])))
                              if negs else -np.inf) - logits[i, p]
        count += 1
  return total / count


def test_supcon_with_distinct_labels_is_nt_xent_and_matches_numpy():
  z = _views()
  loss, metrics = supcon_loss(z, jnp.arange(B), temperature=0.2)
  ref, ref_metrics = _jit(simclr.nt_xent_loss, temperature=0.2)(z[:, 0], z[:, 1])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["acc"], ref_metrics["acc"], rtol=1e-6)
  # Unlabelled rows (-1) are instances: the same value.
  np.testing.assert_allclose(supcon_loss(z, -jnp.ones(B, jnp.int32), temperature=0.2)[0],
                             ref, rtol=1e-5)
  # Repeated labels: the SupCon L_out reference.
  labels = np.arange(B) % 5
  h, rows = _flat(z)
  lab = labels[rows]
  logits = h @ h.T / 0.2
  terms = []
  for i in range(len(h)):
    mask = np.arange(len(h)) != i
    denom = np.log(np.sum(np.exp(logits[i, mask])))
    pos = mask & (lab == lab[i])
    terms.append(-np.mean(logits[i, pos] - denom))
  loss, metrics = supcon_loss(z, jnp.asarray(labels), temperature=0.2)
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  assert float(metrics["anchors"]) == 2 * B


def test_supremix_without_mixtures_is_supcon():
  z = _views(seed=1)
  labels = jnp.arange(B) % 4
  ref, _ = supcon_loss(z, labels, temperature=0.1)
  loss, metrics = supremix_loss(z, labels.astype(jnp.float32), temperature=0.1,
                                         hard_negatives=False, hard_positives=False)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  assert float(metrics["hard_negatives"]) == float(metrics["hard_positives"]) == 0.0
  # The mixtures change it.
  mixed, _ = supremix_loss(z, labels.astype(jnp.float32), temperature=0.1)
  assert abs(float(mixed) - float(ref)) > 1e-2


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tol=0.05, lam=0.7, power=1.0, offset=1.0),
    dict(hn=False, power=2.0),
], ids=["default", "tol_weighted", "positives_only"])
def test_supremix_matches_explicit_mixtures(kw):
  b = 6
  z = _views(b=b, seed=2)
  y = jnp.asarray([0.1, 0.4, 0.12, 0.9, 0.55, 0.4])
  ref = _numpy_supremix(z, y, 0.2, **kw)
  names = dict(tol="tolerance", hn="hard_negatives", hp="hard_positives", lam="negative_mix",
               power="distance_power", offset="count_offset")
  loss, metrics = supremix_loss(z, y, temperature=0.2,
                                         **{names[k]: v for k, v in kw.items()})
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert float(metrics["hard_positives"]) > 0


def test_supremix_hard_positive_mixtures_have_the_anchor_label():
  y = jnp.asarray([0.0, 1.0, 3.0, 7.0])
  z = _views(b=4, seed=3)
  logits, pos, valid, _ = _jit(supremix.supremix_logits, hard_negatives=False)(z, y)
  m = logits.shape[1] // 3
  hp = np.asarray(valid[:, 2 * m:])
  # Anchor y=3 (row 2): below {0, 1} pair with the nearest above (7); above {7} with 1.
  ys = np.tile(np.asarray(y), 2)
  np.testing.assert_array_equal(hp[2], (ys != 3.0))
  # Extreme labels have no partner on the other side: no hard positives.
  assert not hp[0].any() and not hp[3].any()
  assert np.all(np.asarray(pos[:, 2 * m:]) == hp)


def test_hydra_matches_numpy_and_reduces_to_clip():
  z1, z2, gates = _normal(4, (3, B, D))
  gates = 1 / (1 + jnp.exp(-gates))
  y = jnp.arange(B) % 4
  y2 = hydra.partner_labels(jax.random.key(4), y, mode="arbitrary")
  loss, metrics = hydra_loss(z1, z2, gates, y, y2, 10.0)
  np.testing.assert_allclose(loss, _numpy_hydra(z1, z2, gates, np.asarray(y), np.asarray(y2),
                                                10.0), rtol=1e-5)
  np.testing.assert_allclose(metrics["positives"], 4.0)
  # g ≡ 1, y' = y, all labels distinct: CLIP's image->text cross-entropy.
  ones, ids = jnp.ones((B, D)), jnp.arange(B)
  loss, _ = hydra_loss(z1, z2, ones, ids, ids, 10.0)
  np.testing.assert_allclose(loss, _jit(clip.clip_loss, i2t_weight=1.0)(z1, z2, 10.0)[0], rtol=1e-5)


def test_hydra_closed_form_on_identical_embeddings():
  # All logits equal: every positive term is log(1 + K), K the negatives of its row.
  z = jnp.ones((8, D))
  y = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
  loss, _ = hydra_loss(z, z, 0.5 * jnp.ones((8, D)), y, y, 3.0)
  np.testing.assert_allclose(loss, math.log(7.0), rtol=1e-6)
  y2 = (y + 1) % 4  # distinct partner class: 2 positives, 4 removed, 4 negatives per row
  loss, _ = hydra_loss(z, z, jnp.ones((8, D)), y, y2, 3.0)
  np.testing.assert_allclose(loss, math.log(5.0), rtol=1e-6)


def test_partner_label_modes():
  y = jnp.asarray([0, 1, 2, 3, 3, -1, 5, 6])
  rng = jax.random.key(5)
  arb = np.asarray(hydra.partner_labels(rng, y, mode="arbitrary"))
  valid = np.asarray(y) >= 0
  assert np.all(arb[~valid] == -1)
  np.testing.assert_array_equal(np.asarray(hydra.partner_labels(rng, y, mode="identical")), y)
  dist = np.asarray(hydra.partner_labels(rng, y, mode="distinct", num_classes=7))
  assert np.all(dist[valid] != np.asarray(y)[valid]) and np.all((dist[valid] >= 0)
                                                                & (dist[valid] < 7))
  # "arbitrary" permutes the rows: labels (with -1 put back) are a multiset of the batch's.
  perm_rows = np.asarray(y)[np.asarray(jax.random.permutation(rng, 8))]
  np.testing.assert_array_equal(arb, np.where(valid, perm_rows, -1))
  with pytest.raises(ValueError, match="partner mode"):
    hydra.partner_labels(rng, y, mode="nope")


def _parity(fn, args, diff, num_devices=8):
  """Loss, metrics and gradients w.r.t. ``args[i], i in diff``: 8 devices vs one."""

  def run(*xs, axis_name=None):
    def f(*d):
      full = list(xs)
      for i, a in zip(diff, d):
        full[i] = a
      return fn(*full, axis_name=axis_name)
    return jax.value_and_grad(f, argnums=tuple(range(len(diff))), has_aux=True)(
        *[xs[i] for i in diff])

  (ref, ref_m), ref_g = jax.jit(run)(*args)
  mesh = parallel.make_mesh(num_devices)
  sharded = jax.jit(jax.shard_map(lambda *xs: run(*xs, axis_name="data"), mesh=mesh,
                                  in_specs=tuple(P("data") for _ in args),
                                  out_specs=((P(), P()), tuple(P("data") for _ in diff))))
  sharding = parallel.batch_sharding(mesh)
  (loss, m), g = sharded(*[jax.device_put(a, sharding) for a in args])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for k in ref_m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(g, ref_g):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eight_device_parity():
  z = _views()
  labels = jnp.arange(B) % 5
  _parity(lambda z, y, axis_name: supcon.supcon_loss(z, y, temperature=0.2, axis_name=axis_name),
          (z, labels), (0,))
  y = jnp.asarray(np.round(np.random.default_rng(6).uniform(size=B) * 10) / 10, jnp.float32)
  _parity(lambda z, y, axis_name: supremix.supremix_loss(
      z, y, temperature=0.2, tolerance=0.02, distance_power=1.0, count_offset=1.0,
      axis_name=axis_name), (z, y), (0,))
  gates = 1 / (1 + jnp.exp(-_normal(7, (B, D))))
  y2 = hydra.partner_labels(jax.random.key(7), labels, mode="arbitrary")
  _parity(lambda a, b, g, y, y2, axis_name: hydra.hydra_loss(a, b, g, y, y2, 5.0,
                                                             axis_name=axis_name),
          (z[:, 0], z[:, 1], gates, labels, y2), (0, 1, 2))


def test_regression_target_from_the_shapes_boxes():
  import tensorflow as tf

  from conftest import load_config
  from contrastive_jax.data import pipeline, shapes
  singles = set()
  for index in range(6):
    ex = shapes.make_example(index, image_size=32, min_objects=1, max_objects=2)
    ymin, xmin, ymax, xmax = np.asarray(ex["boxes"][0])
    single = int(ex["num_objects"]) == 1
    singles.add(single)
    for kind, value in (("size", (ymax - ymin) * (xmax - xmin)), ("x", (xmin + xmax) / 2),
                        ("y", (ymin + ymax) / 2)):
      got = float(shapes.regression_target(ex, kind))
      np.testing.assert_allclose(got, value if single else -1.0, rtol=1e-6)
  assert singles == {True, False}  # both kinds of scene were checked
  config = load_config("supremix_shapes", "size=tiny")
  spec = pipeline.train_dataset(config).element_spec
  assert spec["target"].shape == (config.batch_size,) and spec["target"].dtype == tf.float32
  assert sorted(pipeline.provided_batch_keys(config.data, has_tokenizer=False)) == sorted(spec)
  with pytest.raises(ValueError, match="regression_target"):
    pipeline.extra_feature_fns(dict(source="shapes", regression_target="area"), None)
  with pytest.raises(ValueError, match="shapes source"):
    pipeline.extra_feature_fns(dict(source="fashion_mnist", regression_target="x"), None)

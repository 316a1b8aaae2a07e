"""X-CLIP multi-grained similarity, shuffled group whitening and DebCSE's inverse-propensity
weights: limits, invariances, closed forms and 8-device value + gradient parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses import clip, debcse, whitening, xclip

B, D, NW, NF = 8, 8, 5, 4


def _jit(fn, **kw):
  return jax.jit(functools.partial(fn, **kw))


def _normal(seed, shape):
  """Test inputs from numpy (each new shape of jax.random compiles a kernel)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform(seed, shape, lo, hi):
  return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, shape), jnp.float32)


def _inputs(seed=0, b=B):
  r = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
  img, txt, frames, words = f32(b, D), f32(b, D), f32(b, NF, D), f32(b, NW, D)
  fmask = jnp.asarray(np.arange(NF)[None] < r.integers(1, NF + 1, (b, 1)))
  wmask = jnp.asarray(np.arange(NW)[None] < r.integers(1, NW + 1, (b, 1)))
  return img, frames, fmask, txt, words, wmask


def test_aosm_limits_and_masking():
  sim = _uniform(1, (6, 7), -1.0, 1.0)
  mask = jnp.arange(7)[None] < jnp.asarray([1, 2, 3, 5, 7, 7])[:, None]
  masked = np.where(mask, np.asarray(sim), np.nan)
  pool = jax.jit(xclip.aosm, static_argnames=())
  np.testing.assert_allclose(pool(sim, mask, temperature=1e-4), np.nanmax(masked, 1), atol=1e-4)
  np.testing.assert_allclose(pool(sim, mask, temperature=1e4), np.nanmean(masked, 1), atol=1e-4)
  # Padding values never matter; a row without valid tokens pools to 0.
  noisy = jnp.where(mask, sim, 50.0)
  np.testing.assert_allclose(pool(noisy, mask, temperature=0.01), pool(sim, mask,
                                                                       temperature=0.01))
  assert float(pool(sim, jnp.zeros_like(mask), temperature=0.01).max()) == 0.0
  # The learnable re-weighting at identity is a no-op; a permutation moves the weights.
  perm = jnp.eye(7)[::-1]
  t = 0.3
  w = jax.nn.softmax(jnp.where(mask, sim / t, -1e9), axis=-1) @ perm
  ref = jnp.sum(jnp.where(mask, w, 0.0) * jnp.where(mask, sim, 0.0), axis=-1)
  np.testing.assert_allclose(pool(sim, mask, temperature=t, reweight=jnp.eye(7)),
                             pool(sim, mask, temperature=t), rtol=1e-6)
  np.testing.assert_allclose(pool(sim, mask, temperature=t, reweight=perm), ref, rtol=1e-5)


def test_xclip_padding_invariance_and_clip_reduction():
  img, frames, fmask, txt, words, wmask = _inputs()
  weights = _normal(2, (B, B))  # a random linear read-out of scores

  @jax.jit
  def value_and_grad(img, frames, fmask, txt, words, wmask):
    fn = lambda i, f, t, w: jnp.sum(weights * xclip.xclip_scores(t, w, wmask, i, f, fmask))
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(img, frames, txt, words)

  value, grads = value_and_grad(img, frames, fmask, txt, words, wmask)
  # Extra padded tokens with arbitrary values: same scores, same gradients on the real tokens,
  # zero gradient on the padding (also on padded slots inside the original length).
  pad = lambda x, m, n, key: (  # noqa: E731
      jnp.concatenate([x, 9 * _normal(key, (B, n, D))], axis=1),
      jnp.concatenate([m, jnp.zeros((B, n), bool)], axis=1))
  frames2, fmask2 = pad(frames, fmask, 3, 30)
  words2, wmask2 = pad(words, wmask, 2, 31)
  frames2 = jnp.where(fmask2[..., None], frames2, frames2 + 1.0)
  words2 = jnp.where(wmask2[..., None], words2, words2 - 1.0)
  value2, grads2 = value_and_grad(img, frames2, fmask2, txt, words2, wmask2)
  np.testing.assert_allclose(value2, value, rtol=1e-5)
  for g2, g, m2, m in ((grads2[0], grads[0], None, None), (grads2[2], grads[2], None, None),
                       (grads2[1], grads[1], fmask2, fmask), (grads2[3], grads[3], wmask2, wmask)):
    if m is None:
      np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6)
    else:
      n = g.shape[1]
      np.testing.assert_allclose(g2[:, :n] * m2[:, :n, None], g * m[..., None], rtol=1e-4,
                                 atol=1e-6)
      assert float(jnp.abs(jnp.where(m2[..., None], 0.0, g2)).max()) == 0.0
  # One token equal to the pooled embedding: all four similarities are the cosine -> CLIP.
  one = jnp.ones((B, 1), bool)
  loss1, _ = jax.jit(xclip.xclip_loss)(img, img[:, None], one, txt, txt[:, None], one, 20.0)
  np.testing.assert_allclose(loss1, jax.jit(clip.clip_loss)(img, txt, 20.0)[0], rtol=1e-5)


def _whiten_np(x, groups, perm, eps):
  x = np.asarray(x, np.float64)[:, perm]
  x = x - x.mean(0)
  k = x.shape[1] // groups
  out = np.zeros_like(x)
  for g in range(groups):
    xs = x[:, g * k:(g + 1) * k]
    lam, u = np.linalg.eigh(xs.T @ xs / len(x))
    out[:, g * k:(g + 1) * k] = xs @ (u * (lam + eps) ** -0.5) @ u.T
  return out[:, np.argsort(perm)]


def test_group_whitening_gives_identity_covariance_per_group():
  z = _normal(3, (32, 8)) @ _normal(4, (8, 8))
  perm = jnp.asarray(np.random.default_rng(5).permutation(8))
  out = np.asarray(_jit(whitening.group_whiten, num_groups=2, eps=1e-6)(z, perm=perm),
                   np.float64)
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
  cov = out.T @ out / len(out)
  p = np.asarray(perm)
  for g in range(2):
    idx = p[g * 4:(g + 1) * 4]
    np.testing.assert_allclose(cov[np.ix_(idx, idx)], np.eye(4), atol=2e-4)
  # Across groups the channels stay correlated: only the groups are whitened.
  assert np.abs(cov[np.ix_(p[:4], p[4:])]).max() > 0.05
  np.testing.assert_allclose(out, _whiten_np(z, 2, p, 1e-6), rtol=1e-3, atol=1e-3)
  # ZCA moves white data least: already white (centred, identity covariance) data is unchanged.
  white = _whiten_np(z, 1, np.arange(8), 0.0)
  again = _jit(whitening.group_whiten, num_groups=2, eps=0.0)(jnp.asarray(white, jnp.float32))
  np.testing.assert_allclose(again, white, atol=2e-4)


def test_ipw_weights_and_sampling():
  p = jnp.asarray([[0.5, 0.25, 0.125, 0.125, 1.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
  valid = jnp.asarray([[True, True, True, True, False], [True, True, True, True, True]])
  w = np.asarray(debcse.ipw_weights(p, valid))
  np.testing.assert_allclose(w[0], np.array([2, 4, 8, 8, 0]) / 5.5, rtol=1e-6)
  np.testing.assert_allclose(w[1], 1.0, rtol=1e-6)  # constant propensity: unit weights
  np.testing.assert_allclose(w.sum(1), valid.sum(1), rtol=1e-6)
  sample = jax.jit(jax.vmap(lambda k: debcse.ipw_sample(k, p, valid, 1)[0][:, 0]))
  draws = np.asarray(sample(jax.random.split(jax.random.key(6), 4000)))
  freq = np.bincount(draws[:, 0], minlength=5) / len(draws)
  np.testing.assert_allclose(freq, np.array([2, 4, 8, 8, 0]) / 22, atol=0.03)
  idx, ok = debcse.ipw_sample(jax.random.key(7), p, valid, 5)
  assert np.asarray(ok).sum(1).tolist() == [4, 5]
  assert sorted(np.asarray(idx)[0][np.asarray(ok)[0]].tolist()) == [0, 1, 2, 3]
  assert sorted(np.asarray(idx)[1].tolist()) == [0, 1, 2, 3, 4]


def test_weighted_info_nce_unit_weights_is_infonce_and_matches_numpy():
  a, c = _normal(8, (B, D)), _normal(9, (B, D))
  fn = _jit(debcse.weighted_info_nce, temperature=0.1)
  ref = _jit(clip.clip_loss, i2t_weight=1.0)(a, c, 10.0)[0]
  np.testing.assert_allclose(fn(a, c, jnp.ones((B, B)))[0], ref, rtol=1e-5)
  w = _uniform(10, (B, B), 0.0, 3.0)
  h1, h2 = [np.asarray(x, np.float64) / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, c)]
  z = h1 @ h2.T / 0.1
  wn = np.asarray(w, np.float64)
  np.fill_diagonal(wn, 1.0)
  terms = np.log(np.sum(wn * np.exp(z), 1)) - np.diag(z)
  np.testing.assert_allclose(fn(a, c, w)[0], terms.mean(), rtol=1e-5)


def _sharded(fn, args, diff):
  def run(*xs, axis_name=None):
    def f(*d):
      full = list(xs)
      for i, v in zip(diff, d):
        full[i] = v
      return fn(*full, axis_name=axis_name)
    return jax.value_and_grad(f, argnums=tuple(range(len(diff))))(*[xs[i] for i in diff])

  ref, ref_g = jax.jit(run)(*args)
  mesh = parallel.make_mesh(8)
  out = jax.jit(jax.shard_map(lambda *xs: run(*xs, axis_name="data"), mesh=mesh,
                              in_specs=tuple(P("data") for _ in args),
                              out_specs=(P(), tuple(P("data") for _ in diff))))
  loss, g = out(*[jax.device_put(x, parallel.batch_sharding(mesh)) for x in args])
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for x, y in zip(g, ref_g):
    assert float(jnp.abs(y).max()) > 0
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_eight_device_parity():
  img, frames, fmask, txt, words, wmask = _inputs(seed=11)
  _sharded(lambda i, f, fm, t, w, wm, axis_name: xclip.xclip_loss(
      i, f, fm, t, w, wm, 20.0, axis_name=axis_name)[0],
           (img, frames, fmask, txt, words, wmask), (0, 1, 3, 4))
  z = _normal(12, (16, 2, D))
  rng = jax.random.key(13)
  _sharded(lambda z, axis_name: whitening.whitenedcse_loss(
      z, rng, num_groups=2, temperature=0.5, axis_name=axis_name)[0], (z,), (0,))
  w = _uniform(14, (B, B), 0.5, 2.0)
  _sharded(lambda a, c, w, axis_name: debcse.weighted_info_nce(
      a, c, w, temperature=0.1, axis_name=axis_name)[0], (img, txt, w), (0, 1, 2))

"""filip_loss: a float64 reference, reduction to CLIP, masking, token reduction and 8-device parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.losses.clip import clip_loss
from contrastive_jax.losses import filip
from contrastive_jax.losses.filip import filip_loss, sample_image_tokens

SCALE = 12.0
filip_scores = jax.jit(filip.filip_scores)  # eager dispatch op by op is slow on 2 CPU cores


def _tokens(b=8, t_img=5, t_txt=4, d=6, seed=0):
  """Paired token tensors (text tokens are noisy copies of image tokens) and uneven masks."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  image = jax.random.normal(k1, (b, t_img, d))
  text = image[:, :t_txt] + 0.7 * jax.random.normal(k2, (b, t_txt, d))
  text_len = jax.random.randint(k3, (b,), 1, t_txt + 1)
  image_len = jax.random.randint(k4, (b,), 1, t_img + 1)
  text_mask = jnp.arange(t_txt)[None, :] < text_len[:, None]
  image_mask = jnp.arange(t_img)[None, :] < image_len[:, None]
  return image, text, text_mask, image_mask


def _reference(image, text, text_mask, image_mask, scale):
  """FILIP in float64 with explicit loops over pairs and valid tokens."""
  image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
  text_mask, image_mask = np.asarray(text_mask), np.asarray(image_mask)
  b = image.shape[0]
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  a = np.zeros((b, b))  # a[i, j]: image i -> text j
  c = np.zeros((b, b))  # c[j, i]: text j -> image i
  for i in range(b):
    xi = unit(image[i][image_mask[i]])
    for j in range(b):
      yj = unit(text[j][text_mask[j]])
      sim = xi @ yj.T
      a[i, j] = np.mean([max(row) for row in sim])
      c[j, i] = np.mean([max(col) for col in sim.T])

  def xent(logits):
    return np.mean([math.log(np.sum(np.exp(r))) - r[k] for k, r in enumerate(logits)])

  return 0.5 * (xent(scale * a) + xent(scale * c)), a, c


def test_matches_float64_reference_with_uneven_masks():
  image, text, text_mask, image_mask = _tokens(seed=1)
  ref, a, c = _reference(image, text, text_mask, image_mask, SCALE)
  assert np.max(np.abs(a - c.T)) > 1e-2  # the two directions really differ here
  scores_i2t, scores_t2i, _ = filip_scores(image, text, text_mask, image_mask=image_mask)
  np.testing.assert_allclose(scores_i2t, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores_t2i, c, rtol=1e-5, atol=1e-6)
  loss, metrics = filip_loss(image, text, text_mask, SCALE, image_mask=image_mask)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["pos_logit"], SCALE * np.mean(np.diag(a)), rtol=1e-5)
  np.testing.assert_allclose(
      metrics["neg_logit"], SCALE * a[~np.eye(len(a), dtype=bool)].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["i2t_acc"], np.mean(a.argmax(1) == np.arange(len(a))))
  np.testing.assert_allclose(metrics["t2i_acc"], np.mean(c.argmax(1) == np.arange(len(c))))


def test_duplicated_token_counts_twice_only_in_the_mean():
  # METHODS §1.3 check 4: a second copy of a valid text token leaves every image-side max
  # (a_ij) unchanged but counts twice in the text-side mean (c_ji); and vice versa.
  image, text, _, _ = _tokens(b=4, t_img=3, t_txt=2, seed=2)
  a1, c1, _ = filip_scores(image, text, jnp.ones((4, 2), bool))
  a2, c2, _ = filip_scores(image, jnp.concatenate([text, text[:, :1]], 1), jnp.ones((4, 3), bool))
  np.testing.assert_allclose(a2, a1, rtol=1e-6)
  assert np.max(np.abs(c2 - c1)) > 1e-3
  a3, c3, _ = filip_scores(jnp.concatenate([image, image[:, :1]], 1), text, jnp.ones((4, 2), bool))
  np.testing.assert_allclose(c3, c1, rtol=1e-6)
  assert np.max(np.abs(a3 - a1)) > 1e-3


def test_single_token_equals_clip():
  image, text, _, _ = _tokens(b=8, t_img=1, t_txt=1, seed=3)
  mask = jnp.ones((8, 1), bool)
  fl = lambda x, y, s: filip_loss(x, y, mask, s)[0]
  cl = lambda x, y, s: clip_loss(x[:, 0], y[:, 0], s)[0]
  np.testing.assert_allclose(fl(image, text, SCALE), cl(image, text, SCALE), rtol=1e-6)
  g_f = jax.grad(fl, argnums=(0, 1, 2))(image, text, jnp.float32(SCALE))
  g_c = jax.grad(cl, argnums=(0, 1, 2))(image, text, jnp.float32(SCALE))
  for g, r in zip(g_f, g_c):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  _, mf = filip_loss(image, text, mask, SCALE)
  _, mc = clip_loss(image[:, 0], text[:, 0], SCALE)
  for k in mc:
    np.testing.assert_allclose(mf[k], mc[k], rtol=1e-5, atol=1e-6)


def test_token_permutation_invariance():
  image, text, text_mask, image_mask = _tokens(seed=4)
  ref, _ = filip_loss(image, text, text_mask, SCALE, image_mask=image_mask)
  pi = jax.random.permutation(jax.random.key(1), image.shape[1])
  pt = jax.random.permutation(jax.random.key(2), text.shape[1])
  loss, _ = filip_loss(image[:, pi], text[:, pt], text_mask[:, pt], SCALE,
                       image_mask=image_mask[:, pi])
  np.testing.assert_allclose(loss, ref, rtol=1e-6)


@jax.jit
def _loss_and_grads(image, text, text_mask, image_mask):
  fn = lambda x, y: filip_loss(x, y, text_mask, SCALE, image_mask=image_mask)[0]
  return jax.value_and_grad(fn, argnums=(0, 1))(image, text)


def test_padding_invariance_both_sides():
  image, text, text_mask, image_mask = _tokens(seed=5)
  b = image.shape[0]
  ref, (ref_gx, ref_gy) = _loss_and_grads(image, text, text_mask, image_mask)
  # Invalid slots of the originals and 3 appended slots per side get arbitrary values
  # (large, of both signs, one of them NaN); all of them are masked.
  k1, k2 = jax.random.split(jax.random.key(6))
  junk_img = 100.0 * jax.random.normal(k1, (b, 3, image.shape[2]))
  junk_txt = -100.0 * jax.random.normal(k2, (b, 3, text.shape[2]))
  junk_txt = junk_txt.at[0, 0, 0].set(jnp.nan)
  image_p = jnp.concatenate([jnp.where(image_mask[..., None], image, 55.0), junk_img], 1)
  text_p = jnp.concatenate([jnp.where(text_mask[..., None], text, -7.0), junk_txt], 1)
  image_mask_p = jnp.pad(image_mask, ((0, 0), (0, 3)))
  text_mask_p = jnp.pad(text_mask, ((0, 0), (0, 3)))
  loss, (gx, gy) = _loss_and_grads(image_p, text_p, text_mask_p, image_mask_p)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  t_img, t_txt = image.shape[1], text.shape[1]
  # Gradients of the valid tokens are unchanged, every padded token gets exactly zero.
  np.testing.assert_allclose(
      np.where(image_mask[..., None], gx[:, :t_img], 0), np.where(image_mask[..., None], ref_gx, 0),
      rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      np.where(text_mask[..., None], gy[:, :t_txt], 0), np.where(text_mask[..., None], ref_gy, 0),
      rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(gx)[~np.asarray(image_mask_p)], 0.0)
  np.testing.assert_array_equal(np.asarray(gy)[~np.asarray(text_mask_p)], 0.0)
  assert np.all(np.abs(np.asarray(ref_gx))[np.asarray(image_mask)].sum(-1) > 0)


def test_late_interaction_scores_ignore_unzeroed_padding():
  # The public helper itself must not rely on padded tokens having been zeroed.
  image, text, text_mask, image_mask = _tokens(seed=12)
  unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  zeroed = lambda v, m: jnp.where(m[..., None], unit(v), 0.0)
  ref = filip.late_interaction_scores(
      zeroed(image, image_mask), image_mask, zeroed(text, text_mask), text_mask)
  raw = filip.late_interaction_scores(unit(image), image_mask, unit(text), text_mask)
  np.testing.assert_allclose(raw, ref, rtol=1e-6, atol=1e-7)


def test_fully_masked_text_row_is_finite_with_zero_gradient():
  image, text, text_mask, image_mask = _tokens(seed=7)
  text_mask = text_mask.at[3].set(False)
  image_mask = image_mask.at[5].set(False)  # and a fully masked image row
  loss, (gx, gy) = _loss_and_grads(image, text, text_mask, image_mask)
  assert np.isfinite(loss) and loss < 10.0  # the empty samples score 0, not −1e9
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  np.testing.assert_array_equal(gy[3], 0.0)
  np.testing.assert_array_equal(gx[5], 0.0)
  assert np.abs(np.asarray(gy)).sum() > 0 and np.abs(np.asarray(gx)).sum() > 0
  a, c, _ = filip_scores(image, text, text_mask, image_mask=image_mask)
  np.testing.assert_array_equal(a[:, 3], 0.0)  # every image vs the empty text
  np.testing.assert_array_equal(c[3], 0.0)  # the empty text vs every image
  np.testing.assert_array_equal(a[5], 0.0)
  np.testing.assert_array_equal(c[:, 5], 0.0)
  scale_grad = jax.grad(
      lambda s: filip_loss(image, text, text_mask, s, image_mask=image_mask)[0])(SCALE)
  assert np.isfinite(scale_grad)


def test_token_reduction_keeps_random_subsets_of_valid_tokens():
  image, text, text_mask, image_mask = _tokens(b=16, t_img=8, seed=8)
  image_mask = image_mask.at[:8].set(True)  # rows 8.. keep their uneven masks
  rng = jax.random.key(11)

  @jax.jit(static_argnums=0)
  def grads(keep, rng):
    fn = lambda x: filip_loss(x, text, text_mask, SCALE, image_mask=image_mask,
                              keep_image_tokens=keep, rng=rng)[0]
    return jax.value_and_grad(fn)(image)

  loss, gx = grads(0.5, rng)
  kept = np.abs(np.asarray(gx)).sum(-1) > 0  # [b, T]: tokens that took part
  valid = np.asarray(image_mask)
  assert not np.any(kept & ~valid)
  np.testing.assert_array_equal(kept.sum(1), np.minimum(valid.sum(1), 4))  # round(0.5·8) = 4
  assert len({tuple(r) for r in kept[:8]}) > 1  # images draw different subsets
  # The loss is FILIP on exactly the kept tokens.
  manual, _ = filip_loss(image, text, text_mask, SCALE, image_mask=jnp.asarray(kept))
  np.testing.assert_allclose(loss, manual, rtol=1e-6)
  # Deterministic given rng, different for another rng; keep = 1 is a no-op.
  np.testing.assert_array_equal(grads(0.5, rng)[1], gx)
  assert grads(0.5, jax.random.key(12))[0] != loss
  np.testing.assert_array_equal(grads(1.0, None)[0], grads(None, None)[0])
  tokens, mask = sample_image_tokens(image, image_mask, 0.25, rng)
  assert tokens.shape == (16, 2, 6) and mask.shape == (16, 2)
  with pytest.raises(ValueError, match="rng"):
    filip_loss(image, text, text_mask, SCALE, keep_image_tokens=0.5)
  with pytest.raises(ValueError, match="fraction"):
    filip_loss(image, text, text_mask, SCALE, keep_image_tokens=0.0, rng=rng)


def test_bf16_inputs_give_float32_loss():
  image, text, text_mask, image_mask = _tokens(seed=9)
  ref, _ = filip_loss(image, text, text_mask, SCALE, image_mask=image_mask)
  bf, _ = filip_loss(image.astype(jnp.bfloat16), text.astype(jnp.bfloat16), text_mask, SCALE,
                     image_mask=image_mask)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, ref, rtol=3e-2)


@pytest.mark.parametrize("keep", [None, 0.5])
def test_sharded_value_and_gradient_match_single_device(keep):
  image, text, text_mask, image_mask = _tokens(b=16, t_img=6, t_txt=5, seed=10)
  scale = jnp.float32(SCALE)
  rng = jax.random.key(5)

  def loss_fn(x, y, tm, im, s, axis_name=None):
    return filip_loss(x, y, tm, s, image_mask=im, keep_image_tokens=keep, rng=rng,
                      axis_name=axis_name)

  ref_loss, ref_metrics = loss_fn(image, text, text_mask, image_mask, scale)
  ref_grads = jax.grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 4))(
      image, text, text_mask, image_mask, scale)

  mesh = parallel.make_mesh(8)

  def local(x, y, tm, im, s):
    loss, metrics = loss_fn(x, y, tm, im, s, axis_name="data")
    grads = jax.grad(lambda *a: loss_fn(*a, axis_name="data")[0], argnums=(0, 1, 4))(
        x, y, tm, im, s)
    return loss, metrics, grads

  data = P("data")
  fn = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(data, data, data, data, P()),
      out_specs=(P(), P(), (data, data, P()))))
  put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))
  loss, metrics, grads = fn(put(image), put(text), put(text_mask), put(image_mask), scale)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert np.max(np.abs(r)) > 1e-4
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

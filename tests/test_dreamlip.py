"""DreamLIP (METHODS.md §1.5): sub-caption sampling, the three loss terms, the objective."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from conftest import load_config
from contrastive_jax import optim, parallel
from contrastive_jax.data import shapes, subcaptions, tokenizers
from contrastive_jax.losses import clip_loss
from contrastive_jax.losses import dreamlip as dl
from contrastive_jax.losses import memory_profile
from contrastive_jax.objectives import make_objective

B, T, D, M = 16, 3, 8, 4


def _jit_vg(fn, argnums):
  return jax.jit(jax.value_and_grad(fn, argnums))


def _inputs(b=B, t=T, d=D, m=M, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (b, d))
  y = x[:, None] + 0.8 * jax.random.normal(k[1], (b, t, d))
  patches = x[:, None] + jax.random.normal(k[2], (b, m, d))
  return x, y, patches


def _valid(b=B, t=T):
  valid = np.ones((b, t), bool)
  valid[1, 1:] = False   # one text left
  valid[5] = False       # no valid text: the row drops out, its texts are no negatives
  valid[10, 0] = False
  return jnp.asarray(valid)


def _normalize(a):
  a = np.asarray(a, np.float64)
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _logsumexp(z):
  z = np.asarray(z, np.float64)
  return z.max() + np.log(np.sum(np.exp(z - z.max())))


# ----------------------------------------------------------------------------- data


def _subcaptions(indices, *, seed=0, k=3, start=0):
  tok = tokenizers.ByteTokenizer(context_length=128)  # long enough: no sentence is truncated
  fn = subcaptions.subcaption_features(tok, seed=seed, num_subcaptions=k)
  ds = shapes.dataset("train", seed=0, image_size=32, start_index=start,
                      num_examples=len(indices))
  out = []
  for ex in ds.map(lambda e: dict(fn(e), long_caption=e["long_caption"]),
                   num_parallel_calls=4, deterministic=True):
    sentences = [s.strip() for s in ex["long_caption"].numpy().decode().split(".")]
    chosen = tok.detokenize(ex["subcaptions"].numpy())
    assert ex["subcaption_mask"].numpy().sum(-1).tolist() == [len(c) + 1 for c in chosen]
    out.append(([s for s in sentences if s], chosen))
  return out


def test_subcaptions_are_distinct_sentences_and_deterministic():
  first = _subcaptions(range(12))
  # Deterministic and resumable: example i gets the same draw when the stream starts later.
  assert first[5:] == _subcaptions(range(5, 12), start=5)
  not_prefix = 0
  for sentences, chosen in first:
    assert set(chosen) <= set(sentences)
    if len(sentences) >= 3:
      assert len(set(chosen)) == 3, (sentences, chosen)
      not_prefix += chosen != sentences[:3]
  assert not_prefix > 0  # a random choice, not the first K sentences
  other_seed = _subcaptions(range(12), seed=1)
  assert [c for _, c in other_seed] != [c for _, c in first]


def test_subcaptions_with_replacement_and_degenerate_captions():
  tok = tokenizers.ByteTokenizer(context_length=32)
  fn = subcaptions.subcaption_features(tok, seed=0, num_subcaptions=4)
  for text, allowed in [("One here.  Two there. ", {"One here", "Two there"}),
                        ("no period", {"no period"}), ("..", {".."})]:
    out = fn({"long_caption": tf.constant(text), "index": tf.constant(7, tf.int64)})
    assert out["subcaptions"].shape == (4, 32)
    assert set(tok.detokenize(out["subcaptions"])) <= allowed


# ----------------------------------------------------------------------------- references


def _multi_positive_reference(x, y, s, valid):
  x, y, valid = _normalize(x), _normalize(y), np.asarray(valid)
  b, t, _ = y.shape
  z = s * x @ y.reshape(b * t, -1).T
  flat = valid.reshape(-1)
  rows = []
  for i in range(b):
    pos = [z[i, i * t + k] for k in range(t) if valid[i, k]]
    if pos:
      rows.append(_logsumexp(z[i, flat]) - np.mean(pos))
  return np.mean(rows)


def _circle_reference(x, y, valid, gamma=32.0, m=0.25):
  """jnp, row by row, with detached α: also a gradient reference."""
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  b, t, _ = y.shape
  texts, owner = y.reshape(b * t, -1), np.repeat(np.arange(b), t)
  flat = np.asarray(valid).reshape(-1)
  rows = []
  for i in range(b):
    pos, neg = flat & (owner == i), flat & (owner != i)
    if not pos.any():
      continue
    c_p, c_n = texts[pos] @ x[i], texts[neg] @ x[i]
    logit_p = -gamma * jax.lax.stop_gradient(jnp.maximum(1 + m - c_p, 0)) * (c_p - 1 + m)
    logit_n = gamma * jax.lax.stop_gradient(jnp.maximum(c_n + m, 0)) * (c_n - m)
    rows.append(jax.nn.softplus(jax.nn.logsumexp(logit_p) + jax.nn.logsumexp(logit_n)))
  return jnp.mean(jnp.stack(rows)) / 10


def _weights_reference(y, patches, delta):
  a = np.einsum("btd,bmd->btm", _normalize(y), _normalize(patches))
  a = (a - a.min(-1, keepdims=True)) / (a.max(-1, keepdims=True) - a.min(-1, keepdims=True))
  a = np.where(a >= delta, a, 0.0)
  return a / a.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- losses


def test_multi_positive_matches_reference_with_masks():
  x, y, _ = _inputs()
  fn = jax.jit(lambda x, y, v: dl.multi_positive_loss(x, y, 7.0, text_valid=v))
  for valid in (None, _valid()):
    loss, metrics = fn(x, y, valid)
    want = _multi_positive_reference(x, y, 7.0, np.ones((B, T), bool) if valid is None else valid)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert 0 <= metrics["acc"] <= 1


def test_multi_positive_with_one_text_is_clip_image_to_text():
  x, y, _ = _inputs(t=1)
  got = _jit_vg(lambda x, y: dl.multi_positive_loss(x, y, 9.0)[0], (0, 1))(x, y)
  want = _jit_vg(lambda x, y: clip_loss(x, y[:, 0], 9.0, i2t_weight=1.0)[0], (0, 1))(x, y)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_circle_matches_reference_value_and_gradient():
  x, y, _ = _inputs(b=4)
  valid = np.ones((4, T), bool)
  valid[2, :2] = False
  got = _jit_vg(lambda x, y: dl.circle_multi_positive_loss(x, y, text_valid=valid)[0],
                (0, 1))(x, y)
  want = _jit_vg(lambda x, y: _circle_reference(x, y, valid), (0, 1))(x, y)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_circle_gradient_vanishes_for_satisfied_pairs():
  # m = 0: a positive at cosine 1 and a negative at cosine −1 have zero weights α (§1.5 check 4).
  e = jnp.eye(4)
  x = e[:2]
  y = jnp.stack([e[0], -e[0]])[:, None]  # image 0's text = e0, image 1's text = −e0
  grad = jax.jit(jax.grad(lambda x: dl.circle_multi_positive_loss(x, y, margin=0.0)[0]))(x)
  np.testing.assert_allclose(grad[0], 0.0, atol=1e-7)
  assert np.abs(grad[1]).max() > 1e-3  # image 1 (orthogonal to its text) still learns


def test_grouping_weights_sum_to_one_and_match_reference():
  _, y, patches = _inputs()
  for delta, resolved in [(0.0, 0.0), (0.3, 0.3), (-1.0, 1 / M)]:
    w = dl.grouping_weights(y, patches, delta=delta)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w, _weights_reference(y, patches, resolved), rtol=1e-5, atol=1e-6)
  assert (dl.grouping_weights(y, patches, delta=0.6) == 0).any()
  with pytest.raises(ValueError, match="drop every patch"):
    dl.grouping_weights(y, patches, delta=1.5)


def test_grouping_all_equal_similarities_give_uniform_weights():
  x, y, _ = _inputs(b=4)
  patches = jnp.broadcast_to(x[:, None] * 2.0, (4, M, D))  # every patch identical
  probe = jax.random.normal(jax.random.key(1), (4, T, M))
  _, grads = _jit_vg(lambda y, p: jnp.sum(probe * dl.grouping_weights(y, p)), (0, 1))(
      y, patches)
  w = dl.grouping_weights(y, patches, delta=0.0)
  np.testing.assert_allclose(w, 1.0 / M, rtol=1e-6)
  assert all(np.isfinite(g).all() for g in grads)  # the loss itself: see the degenerate test


def test_grouping_one_hot_patch_gives_that_patch():
  # δ = 0, patch 2 along the text, the others orthogonal to it (§1.5 check 3).
  e = jnp.eye(D)
  y = e[0][None, None] * 3.0
  patches = jnp.stack([e[1], e[2] - e[3], 2.0 * e[0], e[4]])[None]
  w = dl.grouping_weights(y, patches, delta=0.0)
  np.testing.assert_allclose(w[0, 0], [0, 0, 1, 0], atol=1e-7)


def test_grouping_loss_is_clip_over_pooled_pairs():
  _, y, patches = _inputs()
  w = _weights_reference(y, patches, 0.0)
  pooled = np.einsum("btm,bmd->btd", w, _normalize(patches)).reshape(B * T, D)
  want, _ = clip_loss(jnp.asarray(pooled, jnp.float32), y.reshape(B * T, D), 5.0)
  got, _ = dl.grouping_loss(y, patches, 5.0, delta=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dreamlip_with_one_text_and_extra_terms_off_is_clip():
  x, y, _ = _inputs(t=1)
  fn = lambda x, y, s: dl.dreamlip_loss(x, y, None, s, 1.0, multi_positive_weight=0.0,
                                        grouping_weight=0.0)[0]
  got = _jit_vg(fn, (0, 1, 2))(x, y, 8.0)
  want = _jit_vg(lambda x, y, s: clip_loss(x, y[:, 0], s)[0], (0, 1, 2))(x, y, 8.0)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


@jax.jit
def _all_terms(x, y, patches):
  loss, metrics = dl.dreamlip_loss(x, y, patches, 8.0, 6.0, multi_positive_weight=0.5,
                                   grouping_weight=2.0, delta=0.1)
  want = (clip_loss(x, y[:, 0], 8.0)[0] / T + 0.5 * dl.multi_positive_loss(x, y, 8.0)[0]
          + 2.0 * dl.grouping_loss(y, patches, 6.0, delta=0.1)[0])
  circle, _ = dl.dreamlip_loss(x, y, patches, 8.0, 6.0, multi_positive_form="circle",
                               grouping_weight=0.0)
  circle_want = metrics["clip_loss"] / T + dl.circle_multi_positive_loss(x, y)[0]
  return loss, want, circle, circle_want


def test_dreamlip_sums_its_terms():
  loss, want, circle, circle_want = _all_terms(*_inputs())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(circle, circle_want, rtol=1e-5)


# ----------------------------------------------------------------------------- parity


def _value_and_grads(loss_fn, diff_sharded, diff_replicated, other_sharded=(), devices=None):
  """``loss_fn(*diff_sharded, *diff_replicated, *other_sharded, axis_name)``: loss, metrics and
  gradients w.r.t. the differentiable arguments, on one device or ``devices`` devices."""
  argnums = tuple(range(len(diff_sharded) + len(diff_replicated)))

  def local(*args, axis_name=None):
    (loss, metrics), grads = jax.value_and_grad(
        functools.partial(loss_fn, axis_name=axis_name), argnums, has_aux=True)(*args)
    return loss, metrics, grads

  args = (*diff_sharded, *diff_replicated, *other_sharded)
  if devices is None:
    return jax.jit(local)(*args)
  mesh = parallel.make_mesh(devices)
  specs = ((P("data"),) * len(diff_sharded) + (P(),) * len(diff_replicated)
           + (P("data"),) * len(other_sharded))
  fn = jax.jit(jax.shard_map(functools.partial(local, axis_name="data"), mesh=mesh,
                             in_specs=specs, out_specs=(P(), P(), specs[:len(argnums)])))
  sharding = parallel.batch_sharding(mesh)
  placed = [jax.device_put(a, sharding) if s == P("data") else a for a, s in zip(args, specs)]
  return fn(*placed)


_CASES = {
    "multi_positive": (lambda x, y, p, s, sl, v, axis_name: dl.multi_positive_loss(
        x, y, s, text_valid=v, axis_name=axis_name)),
    "circle": (lambda x, y, p, s, sl, v, axis_name: dl.circle_multi_positive_loss(
        x, y, text_valid=v, axis_name=axis_name)),
    "grouping": (lambda x, y, p, s, sl, v, axis_name: dl.grouping_loss(
        y, p, sl, delta=-1.0, block_size=2, axis_name=axis_name)),
    "dreamlip": (lambda x, y, p, s, sl, v, axis_name: dl.dreamlip_loss(
        x, y, p, s, sl, multi_positive_weight=0.7, grouping_weight=1.3, delta=0.2,
        text_valid=v, block_size=1, axis_name=axis_name)),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_eight_devices_match_one(name):
  x, y, patches = _inputs()
  scales = (jnp.float32(7.0), jnp.float32(4.0))
  args = ((x, y, patches), scales, (_valid(),))
  got = _value_and_grads(_CASES[name], *args, devices=8)
  want = _value_and_grads(_CASES[name], *args)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert set(got[1]) == set(want[1])
  for k in want[1]:
    np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for g, w in zip(got[2], want[2]):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert any(np.abs(g).max() > 0 for g in want[2][:3])


def test_gradients_finite_in_degenerate_batches():
  x, y, _ = _inputs(b=4)
  patches = jnp.ones((4, M, D))  # identical patches: all similarities equal
  valid = np.zeros((4, T), bool)
  valid[0, 0] = True  # one valid text in the batch: no negatives for image 0
  for form, grouping in [("infonce", 1.0), ("circle", 0.0)]:
    loss, grads = _jit_vg(
        lambda x, y, p: dl.dreamlip_loss(x, y, p, 7.0, 7.0, text_valid=valid,
                                         grouping_weight=grouping, multi_positive_form=form)[0],
        (0, 1, 2))(x, y, patches)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- ring form


def _tied_inputs():
  """``_inputs()`` where image 9's best text (cosine 1) has an exact copy at global text 0
  (image 0's raw caption): a dense argmax picks text 0 (a miss), while a ring visiting its own
  texts first would report a hit unless ties go to the lower global index."""
  x, y, _ = _inputs()
  y = y.at[9, 1].set(x[9]).at[0, 0].set(x[9])
  return x, y


def _mp_case(block_size=None, ring_form=True, masked=True):
  def fn(x, y, s, v, axis_name):
    v = v if masked else None
    if ring_form:
      return dl.ring_multi_positive_loss(x, y, s, text_valid=v, block_size=block_size,
                                         axis_name=axis_name)
    return dl.multi_positive_loss(x, y, s, text_valid=v, axis_name=axis_name)
  return fn


def _assert_ring_matches(got, want, grad_rtol=1e-5):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert set(got[1]) == set(want[1])
  for k in want[1]:
    np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for g, w in zip(got[2], want[2]):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=grad_rtol, atol=grad_rtol * np.abs(w).max())


@pytest.fixture(scope="module")
def tied_reference():
  x, y = _tied_inputs()
  args = ((x, y), (jnp.float32(7.0),), (_valid(),))
  return args, _value_and_grads(_mp_case(ring_form=False), *args)


@pytest.mark.parametrize("devices,block_size", [(None, None), (None, 4), (2, 2), (2, None),
                                                (8, 1), (8, 2)])
def test_ring_multi_positive_matches_reference(tied_reference, devices, block_size):
  args, want = tied_reference
  got = _value_and_grads(_mp_case(block_size), *args, devices=devices)
  _assert_ring_matches(got, want)
  assert 0 < want[1]["acc"] < 1  # the argmax metric is informative here
  assert all(np.abs(w).max() > 0 for w in want[2])


def test_ring_multi_positive_without_mask_matches_reference():
  x, y, _ = _inputs(seed=1)
  args = ((x, y), (jnp.float32(5.0),), (_valid(),))  # the mask is ignored (text_valid=None)
  got = _value_and_grads(_mp_case(2, masked=False), *args, devices=8)
  _assert_ring_matches(got, _value_and_grads(_mp_case(ring_form=False, masked=False), *args))


def test_tied_inputs_exercise_the_argmax_tie_break():
  x, y = _tied_inputs()
  sims, _, _ = jax.jit(dl._texts_against_images, static_argnums=3)(x, y, _valid(), None)
  # An exact float32 tie across images, which a dense argmax gives to text 0 (image 0's):
  # the 8-device parity above then needs the ring to break ties the same way.
  assert sims[9, 0] == sims[9, 9 * T + 1] == sims[9].max()
  assert int(jnp.argmax(sims[9])) == 0


@functools.lru_cache(maxsize=None)
def _ring_vg():
  """Jitted ring value and gradients w.r.t. (x, y) on 8 devices, for any ``[B, T]`` mask."""
  mesh = parallel.make_mesh(8)
  vg = lambda x, y, v: jax.value_and_grad(
      lambda x, y: dl.ring_multi_positive_loss(x, y, 7.0, text_valid=v, block_size=1,
                                               axis_name="data"), (0, 1), has_aux=True)(x, y)
  fn = jax.jit(jax.shard_map(vg, mesh=mesh, in_specs=(P("data"),) * 3,
                             out_specs=((P(), P()), (P("data"), P("data")))))
  return lambda *args: fn(*(jax.device_put(a, parallel.batch_sharding(mesh)) for a in args))


def test_ring_multi_positive_degenerate_masks():
  x, y, _ = _inputs()
  one = np.zeros((B, T), bool)
  one[3, 1] = True  # a single valid text: image 3 has no negatives, every other image drops
  reference = jax.jit(jax.value_and_grad(
      lambda x, y, v: dl.multi_positive_loss(x, y, 7.0, text_valid=v), (0, 1), has_aux=True))
  for valid in (one, np.zeros((B, T), bool)):  # L = 0 in both
    (loss, metrics), grads = _ring_vg()(x, y, valid)
    (want, want_metrics), want_grads = reference(x, y, valid)
    np.testing.assert_allclose([loss, want], 0.0, atol=1e-6)
    for g, w in zip(grads, want_grads):
      assert np.isfinite(g).all()
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    for k in ("pos_logit", "neg_logit"):
      np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, atol=1e-6)
  assert not any(np.abs(g).max() for g in grads)  # no positives at all: no gradient


def test_ring_multi_positive_bfloat16_inputs():
  x, y = (a.astype(jnp.bfloat16) for a in _tied_inputs())
  args = ((x, y), (jnp.float32(7.0),), (_valid(),))
  got = _value_and_grads(_mp_case(2), *args, devices=8)
  want = _value_and_grads(_mp_case(ring_form=False), *args)
  assert got[0].dtype == jnp.float32 and got[2][1].dtype == jnp.bfloat16
  # Both normalise in float32: values agree tightly, bfloat16 gradients to its precision.
  _assert_ring_matches(got, want, grad_rtol=2e-2)


def test_ring_multi_positive_memory_is_linear_and_default_in_dreamlip():
  def temp(fn, batch):
    return memory_profile.temp_bytes_tokens(
        lambda x, y, m, s, axis: fn(x[:, 0], y, s, m, axis), batch, 1, 4, 64, 8)

  ring = lambda x, y, s, m, axis: dl.ring_multi_positive_loss(x, y, s, text_valid=m,
                                                              block_size=16, axis_name=axis)
  reference = lambda x, y, s, m, axis: dl.multi_positive_loss(x, y, s, text_valid=m,
                                                              axis_name=axis)
  default = lambda x, y, s, m, axis: dl.dreamlip_loss(
      x, y, None, s, 1.0, text_valid=m, grouping_weight=0.0, block_size=16, axis_name=axis)
  lean = [temp(ring, b) for b in (512, 1024)]
  dense = temp(reference, 1024)  # holds [b, B·T] logits: quadratic in B
  assert lean[1] <= 2.2 * lean[0] and dense >= 3 * lean[1], (lean, dense)
  assert temp(default, 1024) < dense / 2, (lean, dense)  # dreamlip_loss uses the ring


# ----------------------------------------------------------------------------- objective


@pytest.fixture(scope="module")
def objective_setup(b=2, k=3):
  config = load_config("dreamlip_shapes", "size=tiny")
  tok = tokenizers.make_tokenizer(**config.tokenizer)
  objective = make_objective(config, tok)
  rng = np.random.default_rng(0)
  length = tok.context_length
  mask = np.arange(length) < rng.integers(2, length, (b, k + 1))[..., None]
  tokens = np.where(mask, rng.integers(1, 256, (b, k + 1, length)), 0).astype(np.int32)
  size = config.data.image_size
  batch = dict(image=rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
               text=tokens[:, 0], text_mask=mask[:, 0], subcaptions=tokens[:, 1:],
               subcaption_mask=mask[:, 1:])
  params, _ = jax.jit(objective.init)(jax.random.key(0), batch)
  return config, objective, batch, params


def test_objective_encodes_caption_and_subcaptions_in_one_call(objective_setup):
  _, objective, batch, params = objective_setup
  model = objective.model

  @jax.jit
  def run(params, batch):
    out = model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"],
                      batch["subcaptions"], batch["subcaption_mask"])
    alone = [model.apply({"params": params}, batch["text"], batch["text_mask"],
                         method=model.encode_text)[0]]
    for k in range(batch["subcaptions"].shape[1]):
      alone.append(model.apply({"params": params}, batch["subcaptions"][:, k],
                               batch["subcaption_mask"][:, k], method=model.encode_text)[0])
    loss, (metrics, state) = objective.loss(params, {}, batch, jax.random.key(1))
    return out, jnp.stack(alone, axis=1), loss, metrics, state

  out, alone, loss, metrics, state = run(params, batch)
  assert out["text_emb"].shape[:2] == (2, 4)
  np.testing.assert_allclose(out["text_emb"], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["logit_scale_local"], 1 / 0.07, rtol=1e-6)
  assert np.isfinite(loss) and state == {}
  assert {"clip_loss", "multi_positive_loss", "grouping_loss", "logit_scale_local"} <= set(metrics)


def test_both_logit_scales_are_clamped_by_the_optimizer(objective_setup):
  config, _, _, params = objective_setup
  opt_config = ml_collections.ConfigDict(dict(config.optimizer))
  opt_config.update(learning_rate=5.0, warmup_steps=0, grad_clip_norm=0.0)
  opt = optim.make_optimizer(opt_config, 10, config.optimizer.logit_scale_max)
  # Gradients that push every parameter up; the scales must stop at ln 100.
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)

  @jax.jit
  def steps(params):
    state = opt.init(params)
    for _ in range(3):
      updates, state = opt.update(grads, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params

  params = steps(params)
  assert float(params["towers"]["logit_scale"]) == pytest.approx(math.log(100.0))
  assert float(params["local"]["logit_scale"]) == pytest.approx(math.log(100.0))

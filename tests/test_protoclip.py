"""ProtoCLIP (METHODS.md §1.4): prototype losses, back translation, the episodic objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_config
from contrastive_jax import optim, parallel
from contrastive_jax.data import tokenizers
from contrastive_jax.losses import kmeans as km
from contrastive_jax.losses import protoclip as pl
from contrastive_jax.objectives import make_objective
from contrastive_jax.objectives.protoclip import ProtoClip

B, D, K = 16, 8, 5


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _xent(logits, targets):
  return -(targets * np.log(_softmax(logits))).sum(-1)


def _inputs(seed=0, empty=None):
  """Random projections, centroids, PBT centroids and assignments (cluster ``empty`` unused)."""
  ks = jax.random.split(jax.random.key(seed), 8)
  pi = jax.random.normal(ks[0], (B, D))
  pt = pi + jax.random.normal(ks[1], (B, D))
  ci, ct = (jax.random.normal(k, (K, D)) for k in ks[2:4])
  yi, yt = (jax.random.randint(k, (B,), 0, K) for k in ks[4:6])
  if empty is not None:
    yi, yt = (jnp.where(y == empty, (empty + 1) % K, y) for y in (yi, yt))
  # Back-translated centroids as the objective builds them (zero row for an empty cluster).
  cit = pl.back_translate(_normalize(pi), yt, K)
  cti = pl.back_translate(_normalize(pt), yi, K)
  return dict(proj_image=pi, proj_text=pt, proto_scale=jnp.float32(7.0)), dict(
      image_centroids=ci, text_centroids=ct, image_assign=yi, text_assign=yt,
      image_centroids_from_text=cit, text_centroids_from_image=cti)


def _reference_proto_loss(args, kw, tau):
  """numpy float64 transcription of §1.4's L_proto = ½ (L_i2t + L_t2i)."""
  s = float(args["proto_scale"])
  pi, pt = _normalize(args["proj_image"]), _normalize(args["proj_text"])
  ci, ct = (np.asarray(kw[k], np.float64) for k in ("image_centroids", "text_centroids"))
  yi, yt = np.asarray(kw["image_assign"]), np.asarray(kw["text_assign"])
  logits_i = s * pi @ np.asarray(kw["image_centroids_from_text"], np.float64).T
  logits_t = s * pt @ np.asarray(kw["text_centroids_from_image"], np.float64).T
  target_i = _softmax(ct[yt] @ ct.T / tau)
  target_t = _softmax(ci[yi] @ ci.T / tau)
  return 0.5 * (_xent(logits_i, target_i).mean() + _xent(logits_t, target_t).mean()), logits_i


# --- pure functions ---------------------------------------------------------------------------


def test_soft_targets_are_one_hot_for_orthonormal_centroids():  # §1.4 sanity check 1
  centroids = jnp.eye(K, D)
  y = jnp.array([0, 3, 4, 1, 1])
  np.testing.assert_allclose(pl.soft_targets(centroids, y, 1e-3), np.eye(K)[y], atol=1e-6)
  np.testing.assert_array_equal(pl.soft_targets(centroids, y, 0.0), np.eye(K)[y])
  # τ = 1: own cluster e / (e + K − 1), every other one 1 / (e + K − 1).
  t = np.asarray(pl.soft_targets(centroids, y, 1.0))
  np.testing.assert_allclose(t[np.arange(5), y], np.e / (np.e + K - 1), rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


def test_back_translation_of_identical_modalities_returns_the_centroids():  # sanity check 2
  feats = jax.random.normal(jax.random.key(1), (32, D))
  feats = feats / jnp.linalg.norm(feats, axis=1, keepdims=True)
  init = km.init_centroids(jax.random.key(2), feats, K)
  centroids, assign, _ = km.kmeans(feats, init, iterations=50)
  np.testing.assert_allclose(pl.back_translate(feats, assign, K), centroids, rtol=1e-5,
                             atol=1e-6)
  # Sharded over 8 devices: the same table on every device.
  mesh = parallel.make_mesh(8)
  got = jax.jit(jax.shard_map(lambda f, a: pl.back_translate(f, a, K, axis_name="data"),
                              mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))(
      *(jax.device_put(v, parallel.batch_sharding(mesh)) for v in (feats, assign)))
  np.testing.assert_allclose(got, centroids, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_prototype_loss_matches_the_formula(tau):
  args, kw = _inputs()
  loss, metrics = pl.prototype_loss(**args, **kw, teacher_temperature=tau)
  want, logits_i = _reference_proto_loss(args, kw, tau)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  acc = (logits_i.argmax(1) == np.asarray(kw["text_assign"])).mean()
  np.testing.assert_allclose(metrics["proto_i2t_acc"], acc)


def test_empty_cluster_is_a_zero_row_with_zero_logit_and_finite_gradients():  # check 4
  args, kw = _inputs(seed=3, empty=2)
  np.testing.assert_array_equal(kw["image_centroids_from_text"][2], 0.0)
  np.testing.assert_array_equal(kw["text_centroids_from_image"][2], 0.0)
  loss, grads = jax.value_and_grad(
      lambda a: pl.prototype_loss(**a, **kw)[0])(args)
  want, logits_i = _reference_proto_loss(args, kw, 0.01)
  np.testing.assert_array_equal(logits_i[:, 2], 0.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_centroids_and_targets_get_no_gradient():
  args, kw = _inputs()
  tables = {k: v for k, v in kw.items() if "assign" not in k}
  grads = jax.grad(lambda t: pl.prototype_loss(
      **args, **t, image_assign=kw["image_assign"], text_assign=kw["text_assign"])[0])(tables)
  for name, g in grads.items():
    np.testing.assert_array_equal(g, 0.0, err_msg=name)


def _teacher_inputs(seed=4, k_e=4):
  """Random teacher features -> k-means labels y^E and back-translated tables (hard targets)."""
  args, _ = _inputs(seed)
  feats = jax.random.normal(jax.random.key(seed + 100), (B, 6))
  feats = feats / jnp.linalg.norm(feats, axis=1, keepdims=True)
  init = km.init_centroids(jax.random.key(seed), feats, k_e)
  _, y, _ = km.kmeans(feats, init, iterations=10)
  kw = dict(teacher_assign=y,
            image_centroids_from_teacher=pl.back_translate(_normalize(args["proj_image"]), y, k_e),
            text_centroids_from_teacher=pl.back_translate(_normalize(args["proj_text"]), y, k_e))
  return args, kw


def test_external_teacher_loss_matches_the_formula():
  args, kw = _teacher_inputs()
  loss, metrics = pl.external_teacher_loss(**args, **kw)
  s = float(args["proto_scale"])
  y = np.asarray(kw["teacher_assign"])
  hard = np.eye(kw["image_centroids_from_teacher"].shape[0])[y]
  li = s * _normalize(args["proj_image"]) @ np.asarray(kw["image_centroids_from_teacher"]).T
  lt = s * _normalize(args["proj_text"]) @ np.asarray(kw["text_centroids_from_teacher"]).T
  np.testing.assert_allclose(loss, 0.5 * (_xent(li, hard) + _xent(lt, hard)).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ext_i_acc"], (li.argmax(1) == y).mean())


def _sharded_value_and_grad(fn, args, per_sample, tables, num_devices=8):
  """``value_and_grad`` of ``fn(args, per_sample, tables, axis_name)`` w.r.t. ``args`` with the
  per-sample arrays sharded over ``num_devices`` and the tables replicated."""
  mesh = parallel.make_mesh(num_devices)
  arg_specs = dict(proj_image=P("data"), proj_text=P("data"), proto_scale=P())
  local = lambda a, s, t: jax.value_and_grad(
      lambda a: fn(a, s, t, "data"), has_aux=True)(a)
  mapped = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(arg_specs, P("data"), P()),
      out_specs=((P(), P()), arg_specs)))
  shard = lambda x: jax.device_put(x, parallel.batch_sharding(mesh))
  args = {k: shard(v) if k != "proto_scale" else v for k, v in args.items()}
  return mapped(args, jax.tree.map(shard, per_sample), tables)


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def test_prototype_loss_on_eight_devices_equals_one_device():
  args, kw = _inputs()
  per_sample = {k: kw[k] for k in ("image_assign", "text_assign")}
  tables = {k: v for k, v in kw.items() if k not in per_sample}
  fn = lambda a, s, t, axis_name: pl.prototype_loss(**a, **s, **t, axis_name=axis_name)
  want = jax.value_and_grad(lambda a: fn(a, per_sample, tables, None), has_aux=True)(args)
  got = _sharded_value_and_grad(fn, args, per_sample, tables)
  _assert_close(got, want)
  assert float(jnp.abs(want[1]["proto_scale"])) > 1e-4  # the scale does get a gradient


def test_external_teacher_loss_on_eight_devices_equals_one_device():
  args, kw = _teacher_inputs()
  per_sample = {"teacher_assign": kw["teacher_assign"]}
  tables = {k: v for k, v in kw.items() if k not in per_sample}
  fn = lambda a, s, t, axis_name: pl.external_teacher_loss(**a, **s, **t, axis_name=axis_name)
  want = jax.value_and_grad(lambda a: fn(a, per_sample, tables, None), has_aux=True)(args)
  _assert_close(_sharded_value_and_grad(fn, args, per_sample, tables), want)


# --- the objective ----------------------------------------------------------------------------


def _small(config):
  """The tiny shapes config with shorter inputs (faster to compile)."""
  config.tokenizer.context_length, config.data.image_size = 16, 16
  return config


def _objective(teacher=False, **loss):
  config = _small(load_config("protoclip_shapes", "size=tiny"))
  config.loss.update(num_clusters=4, episode_size=32, episode_steps=2, kmeans_iterations=5,
                     **loss)
  tokenizer = tokenizers.make_tokenizer(**config.tokenizer)
  teacher_fn = _teacher(tokenizer.vocab_size) if teacher else None
  return ProtoClip(config, tokenizer, teacher_fn=teacher_fn), config, tokenizer


def _teacher(vocab_size):
  """A frozen random 'text encoder': mean of fixed random token vectors over valid tokens."""
  table = jax.random.normal(jax.random.key(42), (vocab_size, 6))

  def fn(text, mask):
    m = mask.astype(jnp.float32)[..., None]
    return (table[text] * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  return fn


@pytest.fixture(scope="module")
def setup():
  """``(objective, config, tokenizer, batch, params, state)``, initialised once."""
  obj, config, tokenizer = _objective()
  b, size, length = config.batch_size, config.data.image_size, tokenizer.context_length
  ks = jax.random.split(jax.random.key(3), 3)
  lengths = jax.random.randint(ks[2], (b, 1), 3, length)
  batch = dict(image=jax.random.uniform(ks[0], (b, size, size, 3)),
               text=jax.random.randint(ks[1], (b, length), 1, tokenizer.vocab_size),
               text_mask=jnp.arange(length)[None, :] < lengths)
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)
  return obj, config, tokenizer, batch, params, state


def _zero_state(obj, batch):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(obj.init, jax.random.key(0), batch)[1])


def _filled_state(state, step, seed=1):
  """A state at ``step`` whose banks hold random unit rows (as after a full episode)."""
  state = dict(state, step=jnp.int32(step))
  for i, name in enumerate(k for k in state if "bank" in k):
    rows = jax.random.normal(jax.random.key(seed + i), state[name].shape)
    state[name] = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
  return state


def test_first_episode_and_zero_proto_weight_equal_clip(setup):  # §1.4 sanity check 3
  proto_obj, config, tokenizer, batch, params, state = setup
  zero_obj, _, _ = _objective(proto_weight=0.0)
  clip_obj = make_objective(_small(load_config("clip_shapes", "size=tiny")), tokenizer)
  rng = jax.random.key(0)
  grad = lambda obj: jax.jit(jax.value_and_grad(lambda p, s: obj.loss(p, s, batch, rng)[0]))
  clip_loss, clip_grads = grad(clip_obj)(params["towers"], {})
  proto_grad = grad(proto_obj)
  after = _filled_state(state, 2)  # refresh step: prototypes are built and non-trivial
  for fn, s in ((proto_grad, state), (grad(zero_obj), after)):
    loss, grads = fn(params, s)
    np.testing.assert_allclose(loss, clip_loss, rtol=1e-6)
    # The ring CLIP loss sums its blocks in another order than the global view: float32
    # round-off of gradients of magnitude ~60 reaches a few 1e-5 relative.
    _assert_close(grads["towers"], clip_grads, rtol=1e-4, atol=1e-6)
    for g in jax.tree.leaves(grads["proto"]):
      np.testing.assert_array_equal(g, 0.0)
  # With the prototype term on, the same step differs from CLIP (the term is really there).
  loss, grads = proto_grad(params, after)
  assert float(loss) > float(clip_loss) + 0.1
  assert float(jnp.abs(grads["proto"]["logit_scale"])) > 0


def test_objective_on_eight_devices_equals_one_device_across_a_refresh(setup):
  _, config, _, batch, params, _ = setup
  obj, _, _ = _objective(teacher=True, external_weight=1.0)  # no teacher params: same params
  state = _filled_state(_zero_state(obj, batch), 2)
  rng = jax.random.key(0)

  def local(params, state, batch, axis_name=None):
    (loss, (metrics, new_state)), grads = jax.value_and_grad(
        lambda p: obj.loss(p, state, batch, rng, axis_name=axis_name), has_aux=True)(params)
    if axis_name:
      grads = parallel.sync_gradients(grads, axis_name)
    return loss, metrics, new_state, grads

  single = jax.jit(local)
  want = single(params, state, batch)
  mesh = parallel.make_mesh(8)
  sharded = jax.jit(jax.shard_map(lambda p, s, b: local(p, s, b, "data"), mesh=mesh,
                                  in_specs=(P(), P(), P("data")), out_specs=P()))
  got = sharded(params, state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  _assert_close(got, want, rtol=2e-5, atol=1e-5)

  _, metrics, new, _ = want
  assert float(metrics["proto_active"]) == 1 and np.isfinite(float(metrics["ext_loss"]))
  assert int(new["step"]) == 3
  # The refresh is k-means on each bank, keyed by (seed, step), and back translation.
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  fit = {}
  for i, (m, bank) in enumerate((("image", "bank_image"), ("text", "bank_text"),
                                 ("teacher", "teacher_bank"))):
    init = km.init_centroids(jax.random.fold_in(key, i), state[bank], 4)
    fit[m] = km.kmeans(state[bank], init, iterations=5)
  _assert_close(new["image_centroids"], fit["image"][0])
  _assert_close(new["teacher_centroids"], fit["teacher"][0])
  _assert_close(new["image_from_text"],
                pl.back_translate(state["bank_image"], fit["text"][1], 4))
  _assert_close(new["text_from_teacher"],
                pl.back_translate(state["bank_text"], fit["teacher"][1], 4))
  # The batch's normalised projections went into the ring buffer at row (2 mod 2)·16 = 0.
  out = jax.jit(obj.model.apply)({"params": params}, batch["image"], batch["text"],
                                 batch["text_mask"])
  _assert_close(new["bank_text"][:16], _normalize(out["proj_text"]))
  _assert_close(new["bank_text"][16:], state["bank_text"][16:])
  # The next step (no refresh) keeps the prototypes and fills the other half of the ring.
  _, _, newer, _ = single(params, new, batch)
  for k in ("image_centroids", "text_from_image", "teacher_centroids"):
    np.testing.assert_array_equal(newer[k], new[k])
  _assert_close(newer["bank_image"][16:], _normalize(out["proj_image"]))


def test_proto_scale_is_projected_at_ln_100(setup):
  obj, config, _, batch, _, _ = setup
  shapes = jax.eval_shape(obj.init, jax.random.key(0), batch)[0]
  params = jax.tree.map(lambda s: jnp.full(s.shape, 4.6, s.dtype), shapes)
  opt_config = config.optimizer.copy_and_resolve_references()
  opt_config.learning_rate, opt_config.warmup_steps = 1.0, 0
  opt = optim.make_optimizer(opt_config, 10, opt_config.logit_scale_max)
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)  # pushes every parameter up
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_allclose(new["proto"]["logit_scale"], math.log(100.0), rtol=1e-6)
  np.testing.assert_allclose(new["towers"]["logit_scale"], math.log(100.0), rtol=1e-6)
  assert float(new["proto"]["image_proj"]["bias"][0]) > 5.0  # not projected

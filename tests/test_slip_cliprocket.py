"""Label smoothing in the CLIP losses; SLIP and CLIP🚀 objectives (reductions to CLIP, the
composition of their terms, 8-device parity, the local scale's projection)."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from contrastive_jax import losses, optim, parallel, train
from contrastive_jax.data import pipeline


def _embeddings(b=16, d=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (b, d))
  return x, x + 0.7 * jax.random.normal(k2, (b, d))


# ---- label smoothing ---------------------------------------------------------------------


def test_smoothing_with_equal_logits_gives_log_batch_size():
  x = jnp.ones((8, 4))
  for fn in (losses.clip_loss, losses.ring_clip_loss):
    np.testing.assert_allclose(fn(x, x, 10.0, label_smoothing=0.1)[0], math.log(8), rtol=1e-6)


def test_smoothing_identity_and_optax_reference():
  x, y = _embeddings()
  s, eps = 9.0, 0.1
  z = np.asarray(losses.clip_logits(x, y, s)[0], np.float64)  # [B, B], i2t rows
  b = z.shape[0]

  def log_softmax(a):
    return a - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True)) - a.max(
        1, keepdims=True)

  per_dir = lambda a: ((1 - eps) * -np.mean(np.diag(log_softmax(a)))
                       + eps * np.mean(-log_softmax(a)))
  want = 0.5 * (per_dir(z) + per_dir(z.T))
  got, _ = losses.clip_loss(x, y, s, label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain, _ = losses.clip_loss(x, y, s)
  assert abs(float(got) - float(plain)) > 1e-3
  targets = optax.smooth_labels(jnp.eye(b), eps)
  ref = 0.5 * (optax.softmax_cross_entropy(z, targets).mean()
               + optax.softmax_cross_entropy(z.T, targets).mean())
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  weighted, _ = losses.clip_loss(x, y, s, label_smoothing=eps, i2t_weight=0.75)
  np.testing.assert_allclose(weighted, 0.75 * per_dir(z) + 0.25 * per_dir(z.T), rtol=1e-5)


def _ring_sharded(x, y, s, eps, num_devices, block_size):
  mesh = parallel.make_mesh(num_devices)

  def local(x, y, s):
    fn = lambda x, y, s: losses.ring_clip_loss(x, y, s, label_smoothing=eps, i2t_weight=0.6,
                                               block_size=block_size, axis_name="data")[0]
    return jax.value_and_grad(fn, argnums=(0, 1, 2))(x, y, s)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                             out_specs=(P(), (P("data"), P("data"), P()))))
  sharding = parallel.batch_sharding(mesh)
  return fn(jax.device_put(x, sharding), jax.device_put(y, sharding), s)


@pytest.mark.parametrize("num_devices,block_size", [(1, None), (1, 4), (8, 1), (8, None)])
def test_smoothed_ring_matches_global_values_and_gradients(num_devices, block_size):
  x, y = _embeddings()
  s, eps = jnp.float32(7.0), 0.1
  ref, ref_grads = jax.value_and_grad(
      lambda x, y, s: losses.clip_loss(x, y, s, label_smoothing=eps, i2t_weight=0.6)[0],
      argnums=(0, 1, 2))(x, y, s)
  loss, grads = _ring_sharded(x, y, s, eps, num_devices, block_size)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


# ---- objectives --------------------------------------------------------------------------


def _config(name, **changes):
  """The tiny config ``name`` with ``a__b=value`` changes."""
  return tiny_config(name, **changes)


def _objective(name, **changes):
  return train.build(_config(name, **changes))[1]


@functools.lru_cache(maxsize=None)
def _setup(name, **changes):
  """``(config, objective, first batch, initial params)``; cached (one data/init per config)."""
  config = _config(name, **changes)
  tokenizer, objective, _, _ = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  pipeline.validate_batch(batch, objective.batch_keys, config.batch_size)
  batch = {k: v for k, v in batch.items() if k != "index"}
  params, _ = objective.init(jax.random.PRNGKey(0), batch)
  return config, objective, batch, params


def _loss(objective, params, batch):
  """Eager (op by op), so two objectives sharing a computation give bitwise-equal results."""
  return objective.loss(params, {}, batch, None)


def test_slip_batch_and_model_outputs():
  config, objective, batch, params = _setup("slip_shapes")
  assert batch["views"].shape == (16, 2, 32, 32, 3)
  out = objective.model.apply({"params": params}, batch["image"], batch["text"],
                              batch["text_mask"], batch["views"])
  assert out["ssl_emb"].shape == (16, 2, config.model.ssl_head.dim)
  emb, _ = objective.model.apply({"params": params}, batch["image"],
                                 method=objective.model.encode_image)
  np.testing.assert_array_equal(emb, out["image_emb"])


def test_slip_without_ssl_is_clip_exactly():
  _, _, batch, params = _setup("slip_shapes")
  slip0 = _objective("slip_shapes", loss__ssl_scale=0.0)
  loss, (metrics, _) = _loss(slip0, params, batch)
  ref, _ = _loss(_objective("clip_shapes"), params["clip"], batch)
  assert loss == ref
  assert float(metrics["ssl_loss"]) > 0.1  # computed, and weighted by 0


def test_slip_is_clip_plus_weighted_nt_xent():
  _, _, batch, params = _setup("slip_shapes")
  slip = _objective("slip_shapes", loss__ssl_scale=0.5)
  out = slip.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"],
                         batch["views"])
  clip, _ = losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
  ssl, _ = losses.nt_xent_loss(out["ssl_emb"][:, 0], out["ssl_emb"][:, 1], 0.1)
  loss, (metrics, _) = _loss(slip, params, batch)
  np.testing.assert_allclose(loss, clip + 0.5 * ssl, rtol=1e-5)
  np.testing.assert_allclose(metrics["ssl_loss"], ssl, rtol=1e-5)


def test_cliprocket_without_local_terms_is_clip_exactly():
  _, _, batch, params = _setup("cliprocket_shapes")
  rocket0 = _objective("cliprocket_shapes", data__views__local=None)
  assert rocket0.batch_keys == ("image", "text", "text_mask")
  assert "local" not in rocket0.init(jax.random.PRNGKey(0), batch)[0]
  loss, _ = _loss(rocket0, params, batch)
  ref, _ = _loss(_objective("clip_shapes"), params["clip"], batch)
  assert loss == ref


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cliprocket_combines_global_and_smoothed_local_terms(reduction):
  _, _, batch, params = _setup("cliprocket_shapes")
  rocket = _objective("cliprocket_shapes", loss__reduction=reduction)
  inputs = [batch[k] for k in ("image", "text", "text_mask", "local_views", "text_aug",
                               "text_aug_mask")]
  out = rocket.model.apply({"params": params}, *inputs)
  glob, _ = losses.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
  hi, ht, sh = out["local_image_emb"], out["local_text_emb"], out["local_logit_scale"]
  assert hi.shape[1] == 2 and ht.shape[1] == 2
  local = np.mean([losses.clip_loss(hi[:, a], ht[:, t], sh, label_smoothing=0.1)[0]
                   for a in range(2) for t in range(2)])
  unsmoothed = np.mean([losses.clip_loss(hi[:, a], ht[:, t], sh)[0]
                        for a in range(2) for t in range(2)])
  loss, (metrics, _) = _loss(rocket, params, batch)
  factor = 2.0 if reduction == "sum" else 1.0
  np.testing.assert_allclose(loss, factor * (glob + 2 * local) / 3, rtol=1e-5)
  np.testing.assert_allclose(metrics["global_loss"], glob, rtol=1e-5)
  assert abs(local - unsmoothed) > 1e-4
  np.testing.assert_allclose(sh, 10.0, rtol=1e-6)


def test_cliprocket_small_local_views_are_resized_to_the_model():
  _, _, _, params = _setup("cliprocket_shapes")
  config = _config("cliprocket_shapes", data__views__local__size=16)
  tokenizer, rocket, _, _ = train.build(config)
  batch = next(pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)))
  assert batch["local_views"].shape == (16, 2, 16, 16, 3)
  loss, (metrics, _) = _loss(rocket, params, batch)
  assert np.isfinite(loss) and np.isfinite(metrics["local_loss"])
  keys = ("image", "text", "text_mask", "local_views", "text_aug", "text_aug_mask")
  small = rocket.model.apply({"params": params}, *[batch[k] for k in keys])
  resized = dict(batch, local_views=jax.image.resize(batch["local_views"], (16, 2, 32, 32, 3),
                                                     "bilinear"))
  big = rocket.model.apply({"params": params}, *[resized[k] for k in keys])
  np.testing.assert_allclose(small["local_image_emb"], big["local_image_emb"], atol=1e-5)


def test_local_logit_scale_is_projected_like_the_global_one():
  config, _, _, params = _setup("cliprocket_shapes")
  opt_config = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt_config.warmup_steps = 0
  tx = optim.make_optimizer(opt_config, 10, opt_config.logit_scale_max)
  params = jax.tree.map(jnp.asarray, params)  # a copy: the cached params stay as they are
  params["local"]["logit_scale"] = jnp.float32(4.605)  # one Adam step (lr 3e-3) crosses ln 100
  params["clip"]["logit_scale"] = jnp.float32(4.605)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["local"]["logit_scale"] = jnp.float32(-1.0)
  grads["clip"]["logit_scale"] = jnp.float32(-1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["local"]["logit_scale"], math.log(100.0), rtol=1e-7)
  np.testing.assert_allclose(new["clip"]["logit_scale"], math.log(100.0), rtol=1e-7)


@pytest.mark.parametrize("name", ["slip_shapes", "cliprocket_shapes"])
def test_objective_on_8_devices_matches_single_device(name):
  _, objective, batch, params = _setup(name)
  batch = {k: v for k, v in batch.items() if k in objective.batch_keys}
  mesh = parallel.make_mesh(8)

  def local(params, batch):
    return objective.loss(params, {}, batch, None, axis_name="data")[0]

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
  loss = fn(params, jax.device_put(batch, parallel.batch_sharding(mesh)))
  ref, _ = _loss(objective, params, batch)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)

"""Geometry metrics (alignment, uniformity, tolerance): closed forms, a numpy reference,
8-device value+gradient parity, the `geometry` evaluator and the training-metric switch."""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import load_config
from contrastive_jax import evaluate, losses, parallel, train
from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import embedding
from contrastive_jax.evaluate import geometry as evaluate_geometry
from contrastive_jax.losses import geometry as geometry_lib
from contrastive_jax.objectives import image_ssl


class geometry:  # noqa: N801  jitted once (eager op-by-op dispatch is slow on 8 CPU devices)
  uniformity = jax.jit(geometry_lib.uniformity)
  alignment = jax.jit(geometry_lib.alignment, static_argnames="alpha")
  tolerance = jax.jit(geometry_lib.tolerance)
  geometry_metrics = jax.jit(geometry_lib.geometry_metrics)


def _data(b=16, d=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (b, d))
  y = x + 0.5 * jax.random.normal(k2, (b, d))
  labels = jax.random.randint(k3, (b,), -1, 3)  # -1: unlabelled
  return x, y, labels


def _np_reference(x, y, labels, t=2.0):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  n = len(x)
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]  # torch.pdist's pairs
  unif = math.log(np.mean([math.exp(-t * np.sum((x[i] - x[j]) ** 2)) for i, j in pairs]))
  align = np.mean(np.sum((x - y) ** 2, axis=1))
  same = [x[i] @ x[j] for i, j in pairs if labels[i] == labels[j] and labels[i] >= 0]
  return unif, align, np.mean(same)


def _all_metrics(x, y, labels, axis_name=None):
  return (geometry.uniformity(x, axis_name=axis_name),
          geometry.alignment(x, y, axis_name=axis_name),
          geometry.tolerance(x, labels, axis_name=axis_name))


def test_closed_forms():
  e = jnp.eye(4)
  antipodal = jnp.stack([e[0], -e[0]])
  np.testing.assert_allclose(geometry.uniformity(antipodal), -8.0, rtol=1e-6)  # −t·4
  np.testing.assert_allclose(geometry.uniformity(antipodal, t=0.5), -2.0, rtol=1e-6)
  same = jnp.tile(jnp.array([[1.0, 2.0, -1.0, 0.5]]), (6, 1))
  np.testing.assert_allclose(geometry.uniformity(same), 0.0, atol=1e-6)  # log 1
  np.testing.assert_allclose(geometry.alignment(same, 3.0 * same), 0.0, atol=1e-6)
  np.testing.assert_allclose(geometry.alignment(antipodal, -antipodal), 4.0, rtol=1e-6)
  np.testing.assert_allclose(geometry.alignment(antipodal, -antipodal, alpha=1.0), 2.0,
                             rtol=1e-6)
  # Orthonormal rows: every pair at squared distance 2.
  np.testing.assert_allclose(geometry.uniformity(e), -4.0, rtol=1e-6)
  # One-class batch: tolerance is the mean cosine of the distinct pairs.
  x, _, _ = _data()
  xn = np.asarray(x) / np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
  cos = xn @ xn.T
  want = (cos.sum() - np.trace(cos)) / (16 * 15)
  np.testing.assert_allclose(geometry.tolerance(x, jnp.zeros(16, jnp.int32)), want, rtol=1e-5)
  # Unlabelled rows are ignored; no same-label pair gives 0.
  np.testing.assert_allclose(geometry.tolerance(x, -jnp.ones(16, jnp.int32)), 0.0)
  np.testing.assert_allclose(geometry.tolerance(x, jnp.arange(16)), 0.0)


def test_uniform_circle_matches_analytic_limit():
  # N points evenly on the unit circle: the mean of exp(−t‖u−v‖²) over all ordered pairs
  # (self included) is e^{−2t} I₀(2t) up to exponentially small terms (t = 2); the distinct
  # pairs drop the N self pairs, each contributing 1.
  n = 512
  theta = 2 * np.pi * np.arange(n) / n
  z = jnp.asarray(np.stack([np.cos(theta), np.sin(theta)], 1), jnp.float32)
  with_self = math.exp(-4.0) * np.i0(4.0)
  analytic = math.log((n * with_self - 1.0) / (n - 1.0))
  np.testing.assert_allclose(geometry.uniformity(z), analytic, rtol=1e-5)


def test_matches_numpy_reference_and_is_scale_invariant():
  x, y, labels = _data()
  want = _np_reference(x, y, np.asarray(labels))
  got = _all_metrics(x, y, labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(_all_metrics(3 * x, 0.2 * y, labels), want, rtol=1e-5)
  metrics = geometry.geometry_metrics(x, y, labels)
  np.testing.assert_allclose([metrics[k] for k in ("uniformity", "alignment", "tolerance")],
                             want, rtol=1e-5)
  assert set(geometry.geometry_metrics(x, y)) == {"uniformity", "alignment"}


def test_eight_devices_match_single_device_values_and_gradients():
  x, y, labels = _data()

  def fn(x, y, labels, axis_name=None):
    u, a, t = (geometry_lib.uniformity(x, axis_name=axis_name),
               geometry_lib.alignment(x, y, axis_name=axis_name),
               geometry_lib.tolerance(x, labels, axis_name=axis_name))
    return u + 0.7 * a + 1.3 * t, (u, a, t)

  (ref, ref_parts), ref_grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      x, y, labels)
  mesh = parallel.make_mesh(8)

  def local(x, y, labels):
    return jax.value_and_grad(lambda x, y: fn(x, y, labels, "data"), argnums=(0, 1),
                              has_aux=True)(x, y)

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 3,
                                  out_specs=((P(), P()), (P("data"), P("data")))))
  put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))
  (value, parts), grads = sharded(put(x), put(y), put(labels))
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(parts, ref_parts, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    assert np.abs(np.asarray(r)).max() > 1e-3  # the test sees real gradients
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


# --- the `geometry` evaluator -----------------------------------------------------------------

def test_evaluator_arrays_match_the_jax_metrics():
  x, y, labels = _data(b=40)
  got = evaluate_geometry.metrics_from_features(np.asarray(x), np.asarray(y),
                                                np.asarray(labels), chunk=16)
  want = _all_metrics(x, y, labels)
  np.testing.assert_allclose([got[k] for k in ("uniformity", "alignment", "tolerance")], want,
                             rtol=1e-5, atol=1e-7)
  assert "tolerance" not in evaluate_geometry.metrics_from_features(
      np.asarray(x), labels=-np.ones(40, int))


def test_image_only_evaluator_pairs_each_image_with_its_flip():
  # The config's knn entry turned into a geometry one (the CLI override the README gives).
  config = load_config("simclr_shapes", "size=tiny")
  config.eval.evaluators.knn.kind = "geometry"
  config.eval.evaluators.knn.num_examples = 32
  mesh = parallel.make_mesh(8)
  flat = jax.jit(lambda v, x: x.reshape(len(x), -1))
  invariant = jax.jit(lambda v, x: x.mean(axis=2).reshape(len(x), -1))  # mean over width
  out = {}
  for name, fn in (("flat", flat), ("invariant", invariant)):
    encoders = embedding.Encoders(image=fn, text=None, image_tokens=None, text_tokens=None)
    out[name] = evaluate.run_evaluators(config, encoders, {}, None, mesh)
  assert out["invariant"]["geometry/shapes/alignment"] < 1e-6
  assert out["flat"]["geometry/shapes/alignment"] > 1e-3
  ds = pipeline.image_eval_dataset(config.data, split="test", num_examples=32)
  batch = next(ds.batch(32).as_numpy_iterator())
  x = batch["image"].reshape(32, -1)
  np.testing.assert_allclose(out["flat"]["geometry/shapes/uniformity"],
                             geometry.uniformity(x), rtol=1e-4)
  _check_tolerance(out["flat"], x, batch["label"])


def _check_tolerance(results, x, labels):
  """Tolerance is reported iff the split has a same-label pair (shapes has ~70 classes and
  few single-object scenes, so a small split may have none)."""
  labels = np.asarray(labels)
  has_pair = any(np.sum(labels == c) > 1 for c in set(labels.tolist()) if c >= 0)
  assert ("geometry/shapes/tolerance" in results) == has_pair
  if has_pair:
    np.testing.assert_allclose(results["geometry/shapes/tolerance"],
                               geometry.tolerance(x, labels), rtol=1e-4)


# --- training metrics (config.metrics.geometry) ----------------------------------------------

def test_image_text_training_metrics_come_from_the_contrast_step():
  # CLIP (and ConVIRT, its subclass) and SigLIP add them in `contrast`, on the embeddings
  # the loss sees.
  x, y, _ = _data()
  out = {"image_emb": x, "text_emb": y, "logit_scale": jnp.float32(10.0),
         "logit_bias": jnp.float32(-5.0)}
  want = geometry_lib.geometry_metrics(x, y)
  for name in ("clip_shapes", "siglip_shapes"):
    config = load_config(name, "size=tiny")
    config.metrics.geometry = True
    objective = train.build(config)[1]
    plain = copy.copy(objective)
    plain.geometry = False
    loss, (metrics, _) = jax.jit(lambda o, obj=objective: obj.contrast(o, {}, None))(out)
    ref, (ref_metrics, _) = jax.jit(lambda o, obj=plain: obj.contrast(o, {}, None))(out)
    for k in ("uniformity", "alignment"):
      np.testing.assert_allclose(metrics[k], want[k], rtol=1e-6, err_msg=f"{name} {k}")
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert "uniformity" not in ref_metrics


class _Fake(image_ssl.ImageObjective):
  """An image-only objective with a linear 'model' (no flax), NT-Xent on two views."""

  def __init__(self, geometry_on):  # pylint: disable=super-init-not-called
    self.geometry = geometry_on

  def forward(self, params, batch_stats, images, *, axis_name=None):
    return {"proj": images.reshape(len(images), -1) @ params}, batch_stats

  def loss(self, params, state, batch, rng, *, axis_name=None):
    out, _ = self.forward(params, {}, image_ssl.flatten_views(batch["views"]))
    z = image_ssl.unflatten(out["proj"], 2)
    loss, metrics = losses.nt_xent_loss(z[:, 0], z[:, 1], 0.2, axis_name=axis_name)
    return loss, (metrics, state)


class _FakeChild(_Fake):
  def loss(self, params, state, batch, rng, *, axis_name=None):
    loss, (metrics, state) = super().loss(params, state, batch, rng, axis_name=axis_name)
    metrics["calls"] = metrics.get("calls", 0) + 1
    return loss, (metrics, state)


def test_image_only_training_metrics_wrap_every_objective_once():
  k1, k2 = jax.random.split(jax.random.key(3))
  views = jax.random.normal(k1, (8, 3, 4, 4, 2))  # a third view is ignored
  params = jax.random.normal(k2, (32, 6))
  batch, state = {"views": views}, {"batch_stats": {}}
  z = (views.reshape(8, 3, 32) @ params)
  want = geometry_lib.geometry_metrics(z[:, 0], z[:, 1])
  plain_fn = jax.jit(lambda p: _Fake(False).loss(p, state, batch, None))
  plain_loss, (plain_metrics, _) = plain_fn(params)
  assert "uniformity" not in plain_metrics
  plain_grad = jax.jit(jax.grad(lambda p: plain_fn(p)[0]))(params)
  for cls in (_Fake, _FakeChild):
    objective = cls(True)
    counted = {"n": 0}
    inner = objective.geometry_metrics

    def counting(*args, inner=inner, counted=counted, **kwargs):
      counted["n"] += 1
      return inner(*args, **kwargs)

    objective.geometry_metrics = counting
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
        lambda p, o=objective: o.loss(p, state, batch, None), has_aux=True))(params)
    assert counted["n"] == 1, cls  # the outermost override only
    for k in ("uniformity", "alignment"):
      np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, plain_grad, rtol=1e-5, atol=1e-7)


def test_geometry_evaluator_on_a_tiny_image_text_model():
  config = load_config("clip_shapes", "size=tiny")
  tokenizer, objective, mesh, _ = train.build(config)
  ds = pipeline.eval_dataset(config.data, tokenizer, split="test", num_examples=32)
  b = next(ds.batch(32).as_numpy_iterator())
  params = jax.jit(objective.model.init)(jax.random.PRNGKey(0), b["image"][:2], b["text"][:2],
                                         b["text_mask"][:2])["params"]
  # The evaluator pairs each image with its caption (shapes: labelled single-object scenes).
  config.eval.evaluators = {"geometry": dict(kind="geometry", dataset="shapes", split="test",
                                             num_examples=32)}
  encoders = evaluate.jitted_encoders(objective.model)
  variables = {"params": params}
  got = evaluate.run_evaluators(config, encoders, variables, tokenizer, mesh)
  x = encoders.image(variables, b["image"])
  want = geometry.geometry_metrics(x, encoders.text(variables, b["text"], b["text_mask"]))
  for k in ("uniformity", "alignment"):
    np.testing.assert_allclose(got[f"geometry/shapes/{k}"], want[k], rtol=1e-4, err_msg=k)
  _check_tolerance(got, x, b["label"])

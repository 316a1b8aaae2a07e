"""ResNet, BatchNorm MLP heads and the backbone factory: shapes, parameter counts, batch
statistics, synchronised BN on 8 devices == one device on the whole batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import parallel
from contrastive_jax.models import MLPHead, ResNet, ViT, make_backbone, resnet

# Small enough to compile in seconds: two basic-block stages at width 4 on 8×8 images.
TINY = dict(stage_sizes=(1, 1), block="basic", width=4, stem="cifar", zero_init_residual=False)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init(model, x, **kwargs):
  """Variables of ``model`` filled from numpy (compiling flax's threefry init of a ResNet
  takes longer on CPU than the whole test): fan-in-scaled normal kernels, BN scale near 1,
  small biases and embeddings, batch statistics at their init (mean 0, var 1)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "batch_stats" in jax.tree_util.keystr(path[:1]):
      return np.full(leaf.shape, 1.0 if "var" in name else 0.0, np.float32)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if "kernel" in name:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1.0 + 0.1 * noise if "scale" in name else 0.1 * noise

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _shapes(model, x_shape):
  """``(variables, outputs)`` as ShapeDtypeStructs (no compilation)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


@pytest.mark.parametrize("name,channels", [("resnet18", 64), ("resnet50", 256)])
@pytest.mark.parametrize("stem,size,final", [("cifar", 28, 4), ("cifar", 32, 4),
                                             ("imagenet", 28, 1), ("imagenet", 32, 1)])
def test_output_shapes(name, channels, stem, size, final):
  model = resnet(name, width=8, stem=stem)
  assert model.num_features == channels
  _, (pooled, fmap) = _shapes(model, (2, size, size, 3))
  assert pooled.shape == (2, channels) and pooled.dtype == jnp.float32
  assert fmap.shape == (2, final, final, channels)


def test_bfloat16_compute_keeps_float32_params_and_pool():
  model = resnet("resnet18", width=8, stem="cifar", dtype=jnp.bfloat16)
  variables, (pooled, fmap) = _shapes(model, (2, 16, 16, 3))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert pooled.dtype == jnp.float32 and fmap.dtype == jnp.bfloat16


def test_parameter_counts_match_torchvision():
  # torchvision resnet50 / resnet18 have 25,557,032 / 11,689,512 parameters including the
  # 1000-way classifier (2048·1000 + 1000 / 512·1000 + 1000).
  variables, (_, fmap) = _shapes(resnet("resnet50"), (1, 224, 224, 3))
  assert fmap.shape == (1, 7, 7, 2048)
  assert _count(variables["params"]) == 25_557_032 - 2_049_000
  variables, _ = _shapes(resnet("resnet18"), (1, 224, 224, 3))
  assert _count(variables["params"]) == 11_689_512 - 513_000


def _images(b=16, size=8, key=0):
  rng = np.random.default_rng(key)
  return (rng.standard_normal((b, size, size, 3)) + 0.5).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _tiny_variables():
  model = ResNet(**TINY)
  return model, _init(model, _images(2), train=False)


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
  model, variables = _tiny_variables()
  x = _images()
  apply = jax.jit(functools.partial(model.apply, mutable=["batch_stats"]),
                  static_argnames="train")
  (pooled, _), new = apply(variables, x, train=True)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  (pooled_eval, _), same = apply(variables, x, train=False)
  jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])
  # Eval mode is per example (running statistics); train mode depends on the batch.
  (pooled_half, _), _ = apply(variables, x[:8], train=False)
  np.testing.assert_allclose(pooled_half, pooled_eval[:8], rtol=1e-5, atol=1e-6)
  (pooled_half, _), _ = apply(variables, x[:8], train=True)
  assert np.abs(pooled_half - pooled[:8]).max() > 1e-3


def _parity(apply_fn, variables, x, num_devices=8):
  """Train-mode apply on one device vs inside ``shard_map`` with synced / per-device BN.

  ``apply_fn(variables, x, axis_name) -> (out, new_batch_stats)`` with batch-major ``out``.
  Returns ``(reference, synced, per_device)``; each is ``(out, batch_stats, grads)`` (per-device:
  ``(out,)``), ``grads`` of ``Σ out·r`` w.r.t. the params.
  """
  r = jax.tree.map(lambda o: np.random.default_rng(1).standard_normal(o.shape, np.float32),
                   jax.eval_shape(lambda: apply_fn(variables, x, None)[0]))

  def run(variables, x, r, axis_name):
    def loss(params):
      out, stats = apply_fn(dict(variables, params=params), x, axis_name)
      total = sum(jnp.sum(o * w) for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(r)))
      total = total if axis_name is None else jax.lax.psum(total, axis_name)
      return total, (out, stats)
    (_, (out, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return out, stats, grads

  reference = jax.jit(run, static_argnums=3)(variables, x, r, None)
  mesh = parallel.make_mesh(num_devices)
  data = P("data")
  synced = jax.jit(jax.shard_map(
      functools.partial(run, axis_name="data"), mesh=mesh, in_specs=(P(), data, data),
      out_specs=(data, P(), P())))
  per_device = jax.jit(jax.shard_map(
      lambda v, x: apply_fn(v, x, None)[0], mesh=mesh, in_specs=(P(), data), out_specs=data))
  put = lambda t: jax.device_put(t, parallel.batch_sharding(mesh))
  return reference, synced(variables, put(x), jax.tree.map(put, r)), (per_device(variables,
                                                                                  put(x)),)


def _assert_trees_close(got, want, rtol=2e-4, atol=2e-5):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), got, want)


def test_synced_batchnorm_matches_one_device():
  model, variables = _tiny_variables()
  x = _images()

  def apply_fn(v, x, axis_name):
    out, new = model.apply(v, x, train=True, axis_name=axis_name, mutable=["batch_stats"])
    return out, new["batch_stats"]

  reference, synced, (per_device,) = _parity(apply_fn, variables, x)
  _assert_trees_close(synced, reference)
  assert np.abs(np.asarray(reference[2]["stem_conv"]["kernel"])).max() > 1e-4
  # Per-device statistics over 2 images are not the global ones.
  assert np.abs(np.asarray(per_device[0]) - np.asarray(reference[0][0])).max() > 1e-2


def test_mlp_head_batchnorm_parity_and_last_norm():
  head = MLPHead(hidden=16, out=6, num_layers=3, norm="batch", last_norm=True)
  x = _images(16, size=1).reshape(16, 3) @ np.ones((3, 5), np.float32)
  x = x + np.random.default_rng(2).standard_normal((16, 5)).astype(np.float32)
  variables = _init(head, x, train=False)
  assert set(variables["params"]) == {"dense_0", "norm_0", "dense_1", "norm_1", "dense_2"}
  assert "bias" not in variables["params"]["dense_0"]  # redundant before BN
  assert set(variables["batch_stats"]) == {"norm_0", "norm_1", "norm_2"}

  def apply_fn(v, x, axis_name):
    out, new = head.apply(v, x, train=True, axis_name=axis_name, mutable=["batch_stats"])
    return out, new["batch_stats"]

  reference, synced, (per_device,) = _parity(apply_fn, variables, x)
  _assert_trees_close(synced, reference)
  out = np.asarray(reference[0])
  # last_norm: affine-free BN on the output, so every feature is standardised over the batch.
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(0), 1.0, rtol=1e-3)
  assert np.abs(np.asarray(per_device) - out).max() > 1e-2


def test_mlp_head_default_is_the_layernorm_head():
  x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
  head = MLPHead(hidden=8, out=3, num_layers=2)
  variables = _init(head, x)
  assert set(variables) == {"params"} and set(variables["params"]) == {
      "dense_0", "norm_0", "dense_1"}
  out = jax.jit(head.apply)(variables, x)  # existing call sites: head(x)
  p = variables["params"]
  h = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = np.maximum(h * p["norm_0"]["scale"] + p["norm_0"]["bias"], 0.0)
  np.testing.assert_allclose(out, h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"],
                             rtol=1e-5, atol=1e-5)
  assert out.shape == (4, 2, 3) and out.dtype == jnp.float32
  plain = jax.eval_shape(MLPHead(hidden=8, out=3, num_layers=2, norm="none").init,
                         jax.random.key(0), x)
  assert set(plain["params"]) == {"dense_0", "dense_1"}
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(MLPHead(hidden=8, out=3, norm="group").init, jax.random.key(0), x)


@pytest.mark.parametrize("spec,grid,channels", [
    (dict(kind="resnet", name="resnet18", width=4, stem="cifar"), 2, 32),
    (dict(kind="resnet", name="resnet50", width=4, stem="imagenet", dtype="bfloat16"), 1, 128),
    (dict(kind="vit", patch_size=4, width=16, depth=1, num_heads=2, pool="cls"), 4, 16),
    (dict(kind="vit", patch_size=8, width=16, depth=1, num_heads=2, pool="mean"), 2, 16),
])
def test_make_backbone_contract(spec, grid, channels):
  model = make_backbone(spec)
  assert model.num_features == channels
  _, (pooled, fmap) = _shapes(model, (2, 16, 16, 3))
  assert pooled.shape == (2, channels) and pooled.dtype == jnp.float32
  assert fmap.shape == (2, grid, grid, channels)


def test_vit_backbone_map_is_the_vit_patch_tokens():
  spec = dict(kind="vit", patch_size=4, width=16, depth=1, num_heads=2)
  model = make_backbone(spec)
  x = _images(2, size=16)
  variables = _init(model, x, train=True)
  pooled, fmap = jax.jit(lambda v, x: model.apply(v, x, train=True, axis_name="ignored"))(
      variables, x)
  vit = ViT(patch_size=4, width=16, depth=1, num_heads=2)
  ref_pooled, tokens = jax.jit(vit.apply)({"params": variables["params"]["vit"]}, x)
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-6)
  np.testing.assert_allclose(fmap.reshape(2, 16, 16), tokens, rtol=1e-6)


@pytest.mark.parametrize("spec,key", [
    (dict(kind="convnext"), "'kind'"),
    (dict(name="resnet18"), "'kind'"),
    (dict(kind="resnet", name="resnet19"), "'name'"),
    (dict(kind="resnet", name="resnet18", widht=8), "widht"),
    (dict(kind="vit", patch_size=4, width=16, depth=1), "num_heads"),
    (dict(kind="vit", patch_size=4, width=16, depth=1, num_heads=2, stem="cifar"), "stem"),
])
def test_make_backbone_errors_name_the_key(spec, key):
  with pytest.raises(ValueError, match=key):
    make_backbone(spec)


def test_resnet_rejects_bad_fields():
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  for model, field in ((resnet("resnet18", stem="tiny"), "stem"),
                       (ResNet(stage_sizes=(1,), block="dense"), "block")):
    with pytest.raises(ValueError, match=field):
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  with pytest.raises(ValueError, match="resnet19"):
    resnet("resnet19")

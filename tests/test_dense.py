"""Dense zero-shot (issue 12): shapes masks, DenseCLIP score maps, mIoU, ReCo / OVDiff-style
segmentation with the trained shapes CLIP, and DITO's region-text loss (1 vs 8 devices)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import evaluate, parallel
from contrastive_jax.data import shapes
from contrastive_jax.evaluate import dense
from contrastive_jax.losses import clip_loss, dito

import pretrained


# ---- shapes masks ------------------------------------------------------------------------------


def test_masks_leave_examples_unchanged_and_cover_the_objects():
  plain = list(shapes.dataset("test", image_size=48, num_examples=16).as_numpy_iterator())
  masked = list(shapes.dataset("test", image_size=48, num_examples=16,
                               with_masks=True).as_numpy_iterator())
  single = shapes.make_example(5, split="test", image_size=48, with_masks=True)
  np.testing.assert_array_equal(single["mask"].numpy(), masked[5]["mask"])
  for a, b in zip(plain, masked):
    assert set(b) - set(a) == {"mask", "object_classes"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    n, image = b["num_objects"], b["image"].astype(np.float32) / 255.0
    assert b["mask"].dtype == np.int32 and set(np.unique(b["mask"])) == set(range(n + 1))
    np.testing.assert_array_equal(b["object_classes"][:n],
                                  b["colours"][:n] * len(shapes.SHAPES) + b["shapes"][:n])
    assert (b["object_classes"][n:] == -1).all()
    for k in range(n):
      pixels = b["mask"] == k + 1
      # Object k's pixels carry its colour (jitter 0.05, noise 0.04; antialiased rim pixels
      # are blended): their median is near it and nearer to it than to any other colour.
      mean = np.median(image[pixels], axis=0)
      np.testing.assert_allclose(mean, shapes.COLOUR_RGB[b["colours"][k]], atol=0.1)
      dist = np.linalg.norm(np.asarray(shapes.COLOUR_RGB) - mean, axis=1)
      assert np.argmin(dist) == b["colours"][k]
      ys, xs = np.nonzero(pixels)  # inside the object's (annotated) box
      ymin, xmin, ymax, xmax = b["boxes"][k] * 48
      assert ys.min() >= ymin - 1 and ys.max() <= ymax and xs.min() >= xmin - 1
      assert xs.max() <= xmax
    # Background pixels are dark (<= 0.3) except on an object's antialiased rim, inside the
    # object's box (+1 px).
    yy, xx = np.mgrid[:48, :48] + 0.5
    in_box = np.zeros((48, 48), bool)
    for ymin, xmin, ymax, xmax in b["boxes"][:n] * 48:
      in_box |= (yy > ymin - 1) & (yy < ymax + 1) & (xx > xmin - 1) & (xx < xmax + 1)
    assert not ((image.max(-1) > 0.3 + 1e-6) & (b["mask"] == 0) & ~in_box).any()
    assert in_box[b["mask"] > 0].all()


# ---- score maps and mIoU -------------------------------------------------------------------------


def test_score_map_is_a_cosine_and_permutes_with_the_classes():
  k1, k2 = jax.random.split(jax.random.key(0))
  tokens = jax.random.normal(k1, (3, 16, 8))
  text = jax.random.normal(k2, (5, 8))
  s = dense.pixel_text_score_map(tokens, text)
  assert s.shape == (3, 4, 4, 5)
  t = np.asarray(tokens).reshape(3, 4, 4, 8)
  want = np.einsum("nhwe,ce->nhwc", t / np.linalg.norm(t, axis=-1, keepdims=True),
                   text / np.linalg.norm(text, axis=-1, keepdims=True))
  np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-6)
  perm = np.array([3, 0, 4, 1, 2])
  np.testing.assert_allclose(dense.pixel_text_score_map(t * 3.0, text[perm] * 0.5),
                             s[..., perm], rtol=1e-5, atol=1e-6)
  labels = dense.segment(s, jnp.full(s.shape[:3], -2.0))
  permuted = dense.segment(s[..., perm], jnp.full(s.shape[:3], -2.0))
  np.testing.assert_array_equal(perm[np.asarray(permuted) - 1], np.asarray(labels) - 1)
  up = dense.upsample(s, 8)
  assert up.shape == (3, 8, 8, 5) and float(jnp.abs(up).max()) <= 1.0 + 1e-6


def test_miou_closed_forms():
  gt = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
  assert dense.miou(gt, gt, 4) == {"miou": 1.0, "miou_fg": 1.0, "pixel_acc": 1.0}
  # background everywhere: IoU_0 = 4/8, classes 0 (label 3 absent in gt, not averaged).
  out = dense.miou(np.zeros_like(gt), gt, 4)
  np.testing.assert_allclose([out["miou"], out["miou_fg"], out["pixel_acc"]],
                             [0.5 / 3, 0.0, 0.5])
  pred = np.array([[0, 1, 1, 1], [0, 0, 2, 3]])
  # IoU_0 = 3/4, IoU_1 = 2/3, IoU_2 = 1/2 (label 3 only predicted: not in the mean).
  out = dense.miou(pred, gt, 4)
  np.testing.assert_allclose(out["miou"], (3 / 4 + 2 / 3 + 1 / 2) / 3)
  np.testing.assert_allclose(out["miou_fg"], (2 / 3 + 1 / 2) / 2)
  np.testing.assert_allclose(out["pixel_acc"], 6 / 8)
  mask = np.array([[[0, 1], [2, 0]]])
  np.testing.assert_array_equal(dense.ground_truth(mask, np.array([[7, 63, -1, -1]])),
                                [[[0, 8], [64, 0]]])


def test_coseg_picks_the_shared_patch_and_mask_prototypes_split_it():
  e = np.eye(4, dtype=np.float32)  # concept = e0, background = e1, clutter e2 / e3
  pool = np.stack([np.stack([e[1], e[1], e[0], e[2 + i % 2]]) for i in range(4)])
  context = np.stack([np.stack([e[1], e[1], e[1], e[2]])] * 2)
  retrieved = np.array([[0, 1, 2, 3]])
  # Plain co-segmentation also finds the shared background; the contrast set removes it.
  ref = dense.coseg_prototypes(pool.reshape(4, 2, 2, 4), retrieved, context)
  np.testing.assert_allclose(ref, e[:1], atol=1e-6)
  fg, bg = dense.mask_prototypes(pool, retrieved, e[:1], fg_fraction=0.25, bg_fraction=0.5)
  np.testing.assert_allclose(fg, e[:1], atol=1e-6)
  assert float(bg[0, 0]) == 0.0
  labels = dense.nearest_prototype_segment(pool[:1], fg, bg, 2)
  np.testing.assert_array_equal(labels, [[[0, 0], [1, 0]]])


# ---- the trained model ---------------------------------------------------------------------------


# Measured with tests/data/clip_shapes_1500.npz on the first 64 test scenes (pool: 512 train
# scenes): all-background 0.016; denseclip 0.093, reco 0.067, ovdiff 0.062 mIoU.
FLOORS = {"denseclip": 0.06, "reco": 0.045, "ovdiff": 0.04}


def test_segmentation_evaluator_beats_trivial_baselines():
  config, tokenizer, _, mesh, variables, encoders = pretrained.clip_shapes()
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.evaluators = {"seg": {"kind": "segmentation", "dataset": "shapes"}}
  out = evaluate.run_evaluators(config, encoders, variables, tokenizer, mesh)
  trivial = out["segmentation/shapes/all_background_miou"]
  assert trivial < 0.02
  for method, floor in FLOORS.items():
    got = out[f"segmentation/shapes/{method}_miou"]
    assert got > floor > 2.5 * trivial, (method, got)
    assert out[f"segmentation/shapes/{method}_miou_fg"] > 0.02, method


def test_value_path_changes_only_the_patch_tokens():
  config, tokenizer, objective, _, variables, _ = pretrained.clip_shapes()
  images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3), minval=-1.0)
  model = objective.model
  tokens = dense.dense_encoder(model, features="tokens")(variables, images)
  values = dense.dense_encoder(model, features="values")(variables, images)
  np.testing.assert_allclose(tokens, model.apply(variables, images,
                                                 method=model.encode_image)[1], atol=1e-6)
  assert values.shape == tokens.shape == (2, 36, 64)
  assert float(jnp.abs(values - tokens).max()) > 1e-2
  with pytest.raises(ValueError, match="features"):
    dense.dense_encoder(model, features="cls")


# ---- DITO region-text loss -----------------------------------------------------------------------


def _regions(b=16, r=3, h=4, e=8):
  ks = jax.random.split(jax.random.key(2), 4)
  maps = jax.random.normal(ks[0], (b, h, h, e))
  corner = jax.random.uniform(ks[1], (b, r, 2), maxval=0.6)
  boxes = jnp.concatenate([corner, corner + jax.random.uniform(ks[2], (b, r, 2), minval=0.2,
                                                               maxval=0.4)], -1)
  text = jax.random.normal(ks[3], (b, r, e))
  valid = (jnp.arange(b * r) % 5 != 2).reshape(b, r)
  return maps, boxes, valid, text


def test_box_pool_closed_forms():
  maps, *_ = _regions()
  boxes = jnp.tile(jnp.array([[[0.0, 0.0, 1.0, 1.0],  # the whole image
                                [0.25, 0.5, 0.5, 0.75],  # exactly cell (1, 2)
                                [0.0, 0.0, 0.125, 0.25]]]), (16, 1, 1))  # half of cell (0, 0)
  pooled = jax.jit(dito.box_pool)(maps, boxes)
  np.testing.assert_allclose(pooled[:, 0], maps.mean((1, 2)), atol=1e-5)
  np.testing.assert_allclose(pooled[:, 1], maps[:, 1, 2], atol=1e-5)
  np.testing.assert_allclose(pooled[:, 2], maps[:, 0, 0], atol=1e-5)
  levels = jax.jit(lambda m, b: dito.region_embeddings((m, m[:, ::2, ::2]), b,
                                                       level_reduce="max"))(maps, boxes)
  # The cell (1, 2) box lies in cell (0, 1) of the 2x2 level, i.e. maps[:, 0, 2].
  np.testing.assert_allclose(levels[:, 1], jnp.maximum(maps[:, 1, 2], maps[:, 0, 2]), atol=1e-5)


def test_whole_image_box_reduces_to_clip_on_mean_pooled_features():
  maps, _, _, text = _regions(r=1)
  whole = jnp.tile(jnp.array([[[0.0, 0.0, 1.0, 1.0]]]), (16, 1, 1))
  valid = jnp.ones((16, 1), bool)
  fn = lambda m, t: dito.region_text_loss(m, whole, valid, t, 10.0)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))(maps, text)
  ref = lambda m, t: clip_loss(m.mean((1, 2)), t[:, 0], 10.0)
  (ref_loss, ref_metrics), ref_grads = jax.jit(jax.value_and_grad(ref, (0, 1), has_aux=True))(
      maps, text)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["i2t_acc"], ref_metrics["i2t_acc"])
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_padded_regions_are_ignored():
  maps, boxes, valid, text = _regions()
  fn = jax.jit(lambda t: dito.region_text_loss(maps, boxes, valid, t, 10.0))
  loss, metrics = fn(text)
  junk = jnp.where(valid[..., None], text, 1e3 * text[::-1])
  np.testing.assert_allclose(fn(junk)[0], loss, rtol=1e-6)
  assert float(metrics["num_regions"]) == float(valid.sum())


@pytest.mark.parametrize("num_devices", [8])
def test_region_text_loss_parity_across_devices(num_devices):
  maps, boxes, valid, text = _regions()
  kw = dict(level_reduce="max")
  levels = lambda m: (m, m[:, ::2, ::2])
  grad = lambda axis: jax.value_and_grad(
      lambda m, t, b, v: dito.region_text_loss(levels(m), b, v, t, 10.0, axis_name=axis, **kw),
      (0, 1), has_aux=True)
  (ref_loss, ref_metrics), ref_grads = jax.jit(grad(None))(maps, text, boxes, valid)
  mesh = parallel.make_mesh(num_devices)
  local = lambda m, t, b, v: grad("data")(m, t, b, v)
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4,
                             out_specs=((P(), P()), (P("data"), P("data")))))
  sharding = parallel.batch_sharding(mesh)
  (loss, metrics), grads = fn(*(jax.device_put(x, sharding) for x in (maps, text, boxes, valid)))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)

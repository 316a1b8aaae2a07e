"""Dense zero-shot segmentation with an image-text model: DenseCLIP score maps, ReCo
co-segmentation prototypes and OVDiff-style foreground/background prototypes (METHODS.md
§2.4, §2.31, §2.30, §3.1), and the mIoU that scores them.

Dense features. ``TwoTower.encode_image`` returns ``(pooled, tokens)`` where ``tokens`` are
the ViT's patch tokens after its final LayerNorm *and* the image projection ``image_proj``:
they are already in the joint image-text space, so the score map is their cosine with the
text embeddings (no extra projection). Patch tokens of a class-token-pooled ViT are never
trained to align with text, so :func:`dense_encoder` also offers MaskCLIP's "value path"
(``features="values"``; Zhou et al., ECCV 2022): the last encoder block's output at each
patch is replaced by that patch's attention *value* through the attention output projection
(what the class token would receive if it attended to that patch alone; no residual, no MLP),
then the final LayerNorm and ``image_proj`` as usual. The class token is left unchanged.

Background. The shapes text tower never saw a background-only caption, so prompts such as
"a dark textured background" score poorly. ``background="context"`` (our choice, not
DenseCLIP's) scores each patch by its cosine with its image's mean patch feature (background
fills ~90 % of a scene, so the mean is a background prototype) and labels a pixel background
when that score exceeds ``context_threshold``; ``background="prompts"`` is DenseCLIP's argmax
over background prompt(s) ∪ classes.

Labels are ``0`` for background and ``c + 1`` for class ``c``; :func:`miou` accumulates one
confusion matrix over a dataset and averages the IoU over the labels present in the ground
truth (``miou``: background included, VOC-style; ``miou_fg``: classes only).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.data import shapes
from contrastive_jax.evaluate import embedding, zeroshot
from contrastive_jax.models.transformer import EncoderBlock

FEATURES = ("tokens", "values")
BACKGROUNDS = ("context", "prompts")
METHODS = ("denseclip", "reco", "ovdiff")
# Background prompts of background="prompts" (the captions' own words).
BACKGROUND_PROMPTS = ("a dark textured background", "a dark background", "background")


def _normalize(x, axis=-1):
  x = jnp.asarray(x, jnp.float32)
  return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + 1e-8)


def as_grid(patch_tokens) -> jax.Array:
  """``[N, h, w, E]`` from ``[N, h, w, E]`` or ``[N, h*w, E]`` (a square grid), float32."""
  x = jnp.asarray(patch_tokens, jnp.float32)
  if x.ndim == 4:
    return x
  if x.ndim != 3:
    raise ValueError(f"patch tokens must be [N, h, w, E] or [N, h*w, E], got {x.shape}")
  side = math.isqrt(x.shape[1])
  if side * side != x.shape[1]:
    raise ValueError(f"{x.shape[1]} patch tokens do not form a square grid; pass [N, h, w, E]")
  return x.reshape(x.shape[0], side, side, x.shape[2])


def pixel_text_score_map(patch_tokens, text_emb) -> jax.Array:
  """DenseCLIP's pixel-text score map ``S[n, i, j, c] = ẑ(i, j) · t̂_c`` (cosine).

  Args:
    patch_tokens: float ``[N, h, w, E]`` or ``[N, h*w, E]`` dense features in the joint space.
    text_emb: float ``[C, E]`` class (or prompt) embeddings; normalised inside.

  Returns:
    float32 ``[N, h, w, C]`` in ``[-1, 1]``.
  """
  return jnp.einsum("nhwe,ce->nhwc", _normalize(as_grid(patch_tokens)), _normalize(text_emb))


def upsample(maps, size: int) -> jax.Array:
  """Bilinear upsampling of ``[N, h, w, K]`` score maps to ``[N, size, size, K]``."""
  maps = jnp.asarray(maps, jnp.float32)
  return jax.image.resize(maps, (maps.shape[0], size, size, maps.shape[3]), "bilinear")


def context_score(patch_tokens) -> jax.Array:
  """``[N, h, w]``: cosine of each patch feature with its image's mean patch feature."""
  x = _normalize(as_grid(patch_tokens))
  return jnp.einsum("nhwe,ne->nhw", x, _normalize(x.mean(axis=(1, 2))))


def segment(class_scores, background_scores) -> jax.Array:
  """Argmax over background ∪ classes: int32 ``[N, H, W]``, 0 background, ``c + 1`` class c.

  Args:
    class_scores: float ``[N, H, W, C]``.
    background_scores: float ``[N, H, W]`` (e.g. the max over background prompts, or a
      constant threshold); ties go to the background.
  """
  scores = jnp.concatenate([jnp.asarray(background_scores)[..., None], class_scores], -1)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def ground_truth(mask, object_classes) -> np.ndarray:
  """Class label maps from :func:`shapes.make_example`'s ``with_masks`` outputs.

  Args:
    mask: int ``[N, H, W]``, 0 background, ``k + 1`` object ``k``.
    object_classes: int ``[N, K]`` class of each object (-1 padding).

  Returns:
    int32 ``[N, H, W]``: 0 background, ``c + 1`` for class ``c``.
  """
  mask, classes = np.asarray(mask), np.asarray(object_classes)
  padded = np.concatenate([np.full_like(classes[:, :1], -1), classes], axis=1)
  return (np.take_along_axis(padded, mask.reshape(len(mask), -1), 1).reshape(mask.shape)
          + 1).astype(np.int32)


def confusion(pred, gt, num_labels: int) -> np.ndarray:
  """int64 ``[L, L]`` confusion matrix, rows ground truth, columns prediction."""
  pred, gt = np.asarray(pred).ravel().astype(np.int64), np.asarray(gt).ravel().astype(np.int64)
  return np.bincount(gt * num_labels + pred, minlength=num_labels ** 2).reshape(
      num_labels, num_labels)


def miou(pred=None, gt=None, num_labels: Optional[int] = None, *, matrix=None
         ) -> Dict[str, float]:
  """mIoU over the labels present in the ground truth, from label maps or a confusion matrix.

  ``IoU_l = TP / (TP + FP + FN)``, accumulated over all pixels of the dataset. Returns
  ``miou`` (labels present in ``gt``, background 0 included), ``miou_fg`` (labels ≥ 1
  present) and ``pixel_acc``.
  """
  if matrix is None:
    matrix = confusion(pred, gt, num_labels)
  matrix = np.asarray(matrix, np.float64)
  inter = np.diag(matrix)
  union = matrix.sum(0) + matrix.sum(1) - inter
  iou = inter / np.maximum(union, 1.0)
  present = matrix.sum(1) > 0
  fg = present.copy()
  fg[0] = False
  return {"miou": float(iou[present].mean()),
          "miou_fg": float(iou[fg].mean()) if fg.any() else 0.0,
          "pixel_acc": float(inter.sum() / max(matrix.sum(), 1.0))}


# ---- dense features ------------------------------------------------------------------------


def _layer_norm(x, params, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def _value_path(next_fun, args, kwargs, context):
  """flax interceptor: the last image encoder block returns MaskCLIP's value path at patches."""
  module = context.module
  transformer = module.parent
  if (context.method_name != "__call__" or not isinstance(module, EncoderBlock)
      or module.name != f"block{getattr(transformer, 'depth', -1) - 1}"):
    return next_fun(*args, **kwargs)
  x = args[0]
  out = next_fun(*args, **kwargs)
  p = module.variables["params"]
  y = _layer_norm(x.astype(jnp.float32), p["ln_attn"], module.layer_norm_epsilon)
  value = jnp.einsum("nte,ehd->nthd", y, p["attn"]["value"]["kernel"]) + p["attn"]["value"]["bias"]
  value = jnp.einsum("nthd,hde->nte", value, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
  first = 1 if getattr(transformer.parent, "pool", "cls") == "cls" else 0
  return jnp.concatenate([out[:, :first], value[:, first:].astype(out.dtype)], axis=1)


def dense_encoder(model, *, features: str = "tokens"):
  """Jitted ``fn(variables, images [N, H, W, 3]) -> float32 [N, h*w, E]`` dense features.

  ``features="tokens"``: ``model.encode_image``'s projected patch tokens; ``"values"``: the
  MaskCLIP value path of the last ViT block (see the module docstring; ViT towers only).
  """
  if features not in FEATURES:
    raise ValueError(f"dense features={features!r}; expected one of {FEATURES}.")

  def fn(variables, images):
    if features == "values":
      with nn.intercept_methods(_value_path):
        return model.apply(variables, images, method=model.encode_image)[1]
    return model.apply(variables, images, method=model.encode_image)[1]

  return jax.jit(fn)


# ---- ReCo and OVDiff-style prototypes --------------------------------------------------------


def retrieve(image_emb, text_emb, k: int) -> jax.Array:
  """int32 ``[C, k]``: per concept, the ``k`` pool images of highest image-text cosine."""
  scores = _normalize(text_emb) @ _normalize(image_emb).T
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def _cross_max(a, b):
  """``[n]``: for each patch of ``a [n, E]``, mean over images of ``b [m, n', E]`` of the max
  cosine with that image's patches."""
  return jnp.einsum("pe,jqe->pjq", a, b).max(axis=2).mean(axis=1)


def coseg_prototypes(pool_tokens, retrieved, context_tokens=None) -> jax.Array:
  """ReCo co-segmentation: one reference embedding per concept, float32 ``[C, E]``.

  In each retrieved image the seed is the patch whose feature is, on average over the other
  retrieved images, most similar to its best-matching patch there; the reference is the
  normalised mean of the seeds. With ``context_tokens`` (``[m, n, E]``, e.g. random pool
  images) the same average against those images is subtracted from the seed score, so the
  seed is what the concept's images share *and* other images lack (our addition: on shapes
  every scene shares its dark background, which plain co-segmentation would pick).

  Args:
    pool_tokens: float ``[P, n, E]`` (or ``[P, h, w, E]``) dense features of the pool.
    retrieved: int ``[C, k]`` pool indices per concept (``k ≥ 2``).
    context_tokens: optional float ``[m, n, E]``.
  """
  grid = as_grid(pool_tokens)
  feats = _normalize(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
  ctx = None if context_tokens is None else _normalize(as_grid(context_tokens).reshape(
      -1, feats.shape[1], feats.shape[2]))
  k = retrieved.shape[1]
  others = jnp.asarray([[j for j in range(k) if j != i] for i in range(k)], jnp.int32)

  def one(indices):
    imgs = feats[indices]  # [k, n, E]

    def seed(i):
      score = _cross_max(imgs[i], imgs[others[i]])
      if ctx is not None:
        score = score - _cross_max(imgs[i], ctx)
      return imgs[i][jnp.argmax(score)]

    return _normalize(jax.vmap(seed)(jnp.arange(k)).mean(axis=0))

  return jax.lax.map(one, jnp.asarray(retrieved))


def mask_prototypes(pool_tokens, retrieved, queries, *, fg_fraction: float = 0.1,
                    bg_fraction: float = 0.5):
  """OVDiff-style prototypes from reference images: ``(fg [C, E], bg [C, E])`` float32.

  OVDiff localises the object in *generated* support images with the diffusion model's
  attention; here the references are retrieved real images (``retrieved [C, k]``) and the
  object is localised by the cosine of each patch with ``queries [C, E]``: the class text
  embeddings (the pixel-text score map ``S_c``) or, better on shapes, the ReCo references of
  :func:`coseg_prototypes`. In each reference image of class ``c`` the top ``fg_fraction`` of
  its patches are foreground, the bottom ``bg_fraction`` background; each prototype is the
  normalised mean of its patches over the ``k`` references.
  """
  grid = as_grid(pool_tokens)
  feats = _normalize(grid.reshape(grid.shape[0], -1, grid.shape[-1]))
  n = feats.shape[1]
  n_fg, n_bg = max(1, int(round(fg_fraction * n))), max(1, int(round(bg_fraction * n)))
  text = _normalize(queries)

  def one(args):
    indices, t = args
    imgs = feats[indices].reshape(-1, feats.shape[-1])  # [k*n, E]
    order = jnp.argsort(-(feats[indices] @ t), axis=1)  # [k, n], best first
    rows = (jnp.arange(len(indices)) * n)[:, None]
    pick = lambda cols: _normalize(imgs[(rows + cols).ravel()].mean(axis=0))
    return pick(order[:, :n_fg]), pick(order[:, n - n_bg:])

  return jax.lax.map(one, (jnp.asarray(retrieved), text))


def prototype_scores(patch_tokens, prototypes) -> jax.Array:
  """Cosine of every patch with every prototype, float32 ``[N, h, w, P]``."""
  return pixel_text_score_map(patch_tokens, prototypes)


def nearest_prototype_segment(patch_tokens, fg, bg, size: int) -> jax.Array:
  """OVDiff's labelling: each pixel takes the class of its nearest prototype among
  ``fg [C, E]`` (label ``c + 1``) and ``bg [B, E]`` (label 0), after bilinear upsampling
  of the cosine maps to ``size``; int32 ``[N, size, size]``."""
  s = upsample(prototype_scores(patch_tokens, jnp.concatenate([fg, bg])), size)
  c = fg.shape[0]
  return segment(s[..., :c], s[..., c:].max(axis=-1))


# ---- the evaluator ---------------------------------------------------------------------------


def _load(data_config, split: str, num_examples: int, with_masks: bool):
  """``(images float32 [n, S, S, 3] in [-1, 1], labels int32 [n, S, S] or None)``."""
  ds = shapes.dataset(split, seed=data_config.get("seed", 0), image_size=data_config.image_size,
                      num_examples=num_examples, with_masks=with_masks)
  ex = next(ds.batch(num_examples).as_numpy_iterator())
  images = ex["image"].astype(np.float32) / 127.5 - 1.0
  return images, (ground_truth(ex["mask"], ex["object_classes"]) if with_masks else None)


def evaluate(name: str, ev, config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """The ``segmentation`` evaluator on shapes scenes (``config.eval.evaluators.<name>``).

  Segments the first ``num_examples`` (64) scenes of ``split`` with each of ``methods``
  (``"denseclip,reco,ovdiff"``) and returns ``<method>_miou``, ``<method>_miou_fg``,
  ``<method>_pixel_acc`` and the trivial ``all_background_miou``. Options: ``features``
  (``"values"``), ``background`` (``"context"``), ``context_threshold`` (0.85); the ReCo /
  OVDiff pool is the first ``pool_size`` (512) ``pool_split`` (``"train"``) scenes, unlabelled,
  from which ``top_k`` (8) images per class are retrieved; ``num_context`` (64) pool images
  are the co-segmentation's contrast set; ``fg_fraction`` (0.06) / ``bg_fraction`` (0.8) as
  :func:`mask_prototypes`.
  """
  from contrastive_jax.objectives import make_objective  # noqa: PLC0415 (import cycle)
  if ev.dataset != "shapes" or config.data.get("source", "shapes") != "shapes":
    raise ValueError(f"config.eval.evaluators.{name}: segmentation needs shapes scenes "
                     f"(dataset='shapes' and config.data.source='shapes').")
  methods = [m.strip() for m in str(ev.get("methods", ",".join(METHODS))).split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"config.eval.evaluators.{name}.methods: {m!r}; known: {METHODS}.")
  background = ev.get("background", "context")
  if background not in BACKGROUNDS:
    raise ValueError(f"config.eval.evaluators.{name}.background={background!r}; expected one "
                     f"of {BACKGROUNDS}.")
  batch_size = config.eval.batch_size
  dense_fn = dense_encoder(make_objective(config, tokenizer).model,
                           features=ev.get("features", "values"))
  embed = lambda fn, images: embedding.embed_batches(
      fn, variables, ({"image": images[i:i + batch_size]}
                      for i in range(0, len(images), batch_size)), ("image",), mesh, batch_size)
  images, labels = _load(config.data, ev.get("split", "test"), ev.get("num_examples", 64), True)
  size, num_labels = images.shape[1], len(shapes.CLASS_NAMES) + 1
  tokens = embed(dense_fn, images)
  text = zeroshot.classifier(encoders, variables, tokenizer, shapes.CLASS_NAMES,
                             shapes.PROMPT_TEMPLATES, mesh, batch_size)
  if background == "context":
    bg = jnp.where(upsample(context_score(tokens)[..., None], size)[..., 0]
                   > ev.get("context_threshold", 0.85), 2.0, -2.0)  # cosines lie in [-1, 1]
  else:
    prompts = zeroshot.embed_texts(encoders, variables, tokenizer, BACKGROUND_PROMPTS, mesh,
                                   batch_size)
    bg = upsample(pixel_text_score_map(tokens, prompts), size).max(axis=-1)
  out = {"all_background_miou": miou(np.zeros_like(labels), labels, num_labels)["miou"]}
  preds = {}
  if "denseclip" in methods:
    preds["denseclip"] = segment(upsample(pixel_text_score_map(tokens, text), size), bg)
  if "reco" in methods or "ovdiff" in methods:
    pool, _ = _load(config.data, ev.get("pool_split", "train"), ev.get("pool_size", 512), False)
    pool_tokens = embed(dense_fn, pool)
    retrieved = retrieve(embed(encoders.image, pool), text, ev.get("top_k", 8))
    references = coseg_prototypes(pool_tokens, retrieved,
                                  pool_tokens[:ev.get("num_context", 64)])
    if "reco" in methods:
      preds["reco"] = segment(upsample(prototype_scores(tokens, references), size), bg)
    if "ovdiff" in methods:
      fg_protos, bg_protos = mask_prototypes(
          pool_tokens, retrieved, references, fg_fraction=ev.get("fg_fraction", 0.06),
          bg_fraction=ev.get("bg_fraction", 0.8))
      preds["ovdiff"] = nearest_prototype_segment(tokens, fg_protos, bg_protos, size)
  for method, pred in preds.items():
    out.update({f"{method}_{k}": v for k, v in miou(pred, labels, num_labels).items()})
  return out

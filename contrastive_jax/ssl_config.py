"""Shared settings of the image-only (self-supervised) objectives.

``configs/<method>_fashion_mnist.py`` and ``configs/<method>_shapes.py`` call
:func:`image_only` and set their own ``loss`` / optimizer fields. Arguments
(``--config configs/simclr_fashion_mnist.py:size=tiny,steps=20``):
  size:  ``cpu`` (default: the benchmark setting, minutes on 2 CPU cores) or ``tiny``
         (seconds; used by the tests).
  steps: total optimizer steps (0: the size's default).

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (28×28 grey images,
served as 3 channels); ``config.data.data_dir`` overrides its directory.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from contrastive_jax.config_args import parse_arg

DATASETS = ("fashion_mnist", "shapes")
NUM_EXAMPLES = {"fashion_mnist": 60000, "shapes": 4096}  # shapes: a finite training set
# size=cpu steps: SimCLR (21 min) and SwAV fit in 30 minutes on 2 cores with their evaluations
# (benchmarks/ssl_fashion_mnist.py); the others are scaled by their step cost, not measured.
CPU_STEPS = {"simclr": 4500, "dcl": 4500, "isogclr": 4500, "swav": 1800, "mochi": 3500,
             "pixpro": 3000,
             "mlcd": 4000, "beclr": 3000, "sbcl": 4500,
             "groco": 4500, "cacr": 2400}  # cacr: 4 views a step


def _method(c, objective: str, dataset: str, tiny: bool) -> None:
  """The method's own fields (METHODS.md defaults, scaled to small images and short runs)."""
  loss = c.loss
  if objective in ("simclr", "dcl"):  # ring losses: local anchor rows scored at once
    loss.block_size = config_dict.placeholder(int)
  if objective == "simclr":
    loss.temperature = 0.2
  elif objective == "dcl":
    loss.temperature = 0.2
    loss.sigma = config_dict.placeholder(float)  # a float (0.5): DCLW
    loss.stop_gradient_weights = True
  elif objective == "swav":
    loss.update(num_prototypes=16 if tiny else 100, temperature=0.1, epsilon=0.05,
                sinkhorn_iterations=3)
    small = 16 if dataset == "fashion_mnist" else (16 if tiny else 24)
    c.data.views.multicrop = dict(num=2 if tiny else 4, size=small, scale=(0.1, 0.4),
                                  **{k: v for k, v in _views(dataset, tiny).items()
                                     if k not in ("num", "size", "scale")})
    c.optimizer.unit_norm = ("prototypes",)
    c.optimizer.freeze = {"prototypes": 3 if tiny else 200}  # ~1 epoch of Fashion-MNIST
  elif objective == "mochi":
    loss.update(temperature=0.2, queue_size=64 if tiny else 4096, momentum=0.99,
                momentum_schedule="constant", num_hard=8 if tiny else 128,
                num_mix=4 if tiny else 64, num_query_mix=2 if tiny else 32,
                mix_start=0 if tiny else 200)
  elif objective == "ft":  # MoCo-v2 + Feature Transformation (reference's published command)
    loss.update(temperature=0.2, queue_size=64 if tiny else 4096, momentum=0.99,
                momentum_schedule="constant", alpha_pos=2.0, alpha_neg=1.6, extrapolate=True,
                per_dim=False, renormalize=False)
  elif objective == "pixpro":
    c.data.views.ssl.boxes = True
    dim = c.model.projector.dim
    c.model.projector.update(layers=2)
    c.model.predictor = dict(hidden=dim, dim=dim, layers=1, norm="none")
    loss.update(gamma=2.0, threshold=0.7, momentum=0.99, momentum_schedule="cosine")
  elif objective == "isogclr":
    c.data.num_examples = NUM_EXAMPLES[dataset]
    loss.update(num_examples=NUM_EXAMPLES[dataset], tau_init=0.1, gamma=0.8, rho=6.0,
                eta=0.03, beta_u=0.9, tau_min=0.05, tau_max=1.0)
  elif objective == "groco":  # tiny: a steeper sort, so 4 smoke-test steps move the loss
    loss.update(num_negatives=10, steepness=10.0 if tiny else 1.0, dist="cauchy",
                stop_gradient=True)
  elif objective == "cacr":  # the reference has 5 views (4 positives per query)
    c.data.views.ssl.num = 3 if tiny else 4
    loss.update(alpha=1.0, beta=1.0, t_pos=1.0, t_neg=0.9, stop_gradient_weights=True)
  elif objective == "mlcd":  # clusters of the model's own features (see objectives/mlcd.py)
    loss.update(num_classes=8 if tiny else 64, num_positive=2 if tiny else 4,
                scale=16.0 if tiny else 32.0, margin=0.0 if tiny else 0.1, negative_ratio=1.0,
                shard_classes=True, bank_size=16 if tiny else 4096,
                cluster_steps=2 if tiny else 200, kmeans_iterations=5 if tiny else 20)
  elif objective == "beclr":  # 3-layer projector, bottleneck predictor (dim -> dim/4 -> dim)
    dim = c.model.projector.dim
    c.model.projector.update(layers=3, last_norm=True)
    c.model.predictor = dict(hidden=dim // 4, dim=dim, layers=2, norm="batch")
    loss.update(neg_weight=0.1, temperature=2.0, momentum=0.99 if tiny else 0.995,
                momentum_schedule="cosine", topk=2 if tiny else 5,
                num_clusters=4 if tiny else 64, memory_size=64 if tiny else 2560,
                memory_start=2 if tiny else 300, epsilon=0.05, sinkhorn_iterations=10,
                centroid_momentum=0.0, kmeans_iterations=5 if tiny else 20, recluster_steps=0)
  elif objective == "sbcl":  # needs labels: single-object scenes only
    if dataset == "shapes":
      c.data.min_objects = c.data.max_objects = 1
    loss.update(num_classes=64 if dataset == "shapes" else 10, max_subclasses=4 if tiny else 8,
                subclass_size=config_dict.placeholder(int) if tiny else 16, temperature=0.1,
                class_temperature=0.12, class_weight=0.2, subclass_weight=1.0,
                bank_size=16 if tiny else 4096, cluster_steps=2 if tiny else 300,
                kmeans_iterations=5 if tiny else 10)
  elif objective == "hydra":  # needs labels: single-object scenes only
    if dataset == "shapes":
      c.data.min_objects = c.data.max_objects = 1
    dim = c.model.projector.dim
    c.model.gate = dict(num_classes=64 if dataset == "shapes" else 10, embed_dim=dim,
                        hidden=2 * dim, logit_scale_init=2.302585)  # θ₀ = ln(1/0.1)
    loss.update(partner_mode="arbitrary")
  elif objective == "supremix":  # regression of the object's box area: full-image views
    if dataset != "shapes":
      raise ValueError("supremix needs a regression target: dataset='shapes' only.")
    c.data.min_objects = c.data.max_objects = 1
    c.data.regression_target = "size"  # or "x" / "y": the box centre
    c.data.views.ssl.update(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # crops would change it
    loss.update(temperature=0.1, tolerance=0.0, hard_negatives=True, hard_positives=True,
                negative_mix=0.5, distance_power=1.0, count_offset=1.0)
  else:
    raise ValueError(f"image-only config objective={objective!r} has no settings.")


def _views(dataset: str, tiny: bool) -> dict:
  """SimCLR's view recipe, scaled to the data: grey 28 px images get no colour or blur."""
  if dataset == "fashion_mnist":
    return dict(num=2, size=28, scale=(0.2, 1.0), flip=True, jitter=(0.4, 0.4, 0.0, 0.0),
                jitter_p=0.8, gray_p=0.0, blur_p=0.0)
  return dict(num=2, size=32 if tiny else 48, scale=(0.2, 1.0), flip=True,
              jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)


def image_only(arg=None, *, objective: str, dataset: str) -> ml_collections.ConfigDict:
  """The image-only config of ``objective`` on ``dataset`` (``fashion_mnist`` or ``shapes``)."""
  arg = parse_arg(arg, size="cpu", steps=0)
  if arg.size not in ("cpu", "tiny"):
    raise ValueError(f"image-only config size={arg.size!r}; expected 'cpu' or 'tiny'.")
  if dataset not in DATASETS:
    raise ValueError(f"image-only config dataset={dataset!r}; expected one of {DATASETS}.")
  tiny = arg.size == "tiny"

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = objective
  c.total_steps = arg.steps or (60 if tiny else CPU_STEPS.get(objective, 3000))
  c.batch_size = 16 if tiny else 256

  if dataset == "fashion_mnist":
    c.data = dict(source="fashion_mnist", seed=0, image_size=28,
                  data_dir=config_dict.placeholder(str))
  else:
    c.data = dict(source="shapes", seed=0, image_size=32 if tiny else 48, min_objects=1,
                  max_objects=4, text_key="caption")
  c.data.views = dict(ssl=_views(dataset, tiny))

  # On 2 CPU cores a ResNet-18 at width 16 with the 7×7/2 + max-pool stem trains ≈ 900
  # examples/s at 28 px (two views each); the 3×3 "cifar" stem keeps 4× more positions and
  # runs ≈ 4× slower. Tiny: a ResNet-10 at width 8.
  width = 8 if tiny else 16
  c.model = dict(
      backbone=dict(kind="resnet", name="resnet10" if tiny else "resnet18", width=width,
                    stem="cifar" if tiny else "imagenet"),
      projector=dict(hidden=4 * width if tiny else 512, dim=32 if tiny else 128, layers=2,
                     norm="batch"),
      batch_norm="global",  # 'global' (synchronised over the data axis) or 'device'
      dtype="float32",
  )
  c.loss = dict()

  c.optimizer = dict(name="adamw", learning_rate=2e-3, warmup_steps=5 if tiny else 100,
                     end_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                     grad_clip_norm=0.0, skip_nonfinite=False, max_consecutive_nonfinite=10)

  _method(c, objective, dataset, tiny)
  # mode: 'jit' (shard_map) or 'pmap'. FSDP and GradCache need image-text objectives split
  # into embed / contrast; these keep fsdp_axis_size = accum_steps = 1.
  c.parallel = dict(mode="jit", data_axis_size=-1, fsdp_axis_size=1, accum_steps=1)
  c.checkpoint = dict(every_steps=20 if tiny else 500, keep=3, async_save=True)
  c.log_every_steps = 10 if tiny else 50
  # metrics.geometry: log uniformity / alignment while training (objectives.base).
  c.metrics = dict(geometry=False)

  c.eval = dict(
      every_steps=0 if tiny else 1500,  # 0: only at the end
      batch_size=64 if tiny else 512,  # divisible by 8 devices (config_check)
      evaluators=dict(
          knn=dict(kind="knn", dataset=dataset, train_split="train", test_split="test",
                   num_train=256 if tiny else (4096 if dataset == "shapes" else
                                               config_dict.placeholder(int)),
                   num_test=128 if tiny else config_dict.placeholder(int),
                   k=20 if tiny else 200, temperature=0.1),
      ),
  )
  if not tiny:  # the same embedded splits: the probe costs one L-BFGS fit
    c.eval.evaluators.linear_probe = dict(
        kind="linear_probe", dataset=dataset, train_split="train", test_split="test",
        num_train=c.eval.evaluators.knn.num_train, num_test=c.eval.evaluators.knn.num_test,
        l2=1e-4, steps=200)
  return c

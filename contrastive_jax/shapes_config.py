"""Shared settings of the image-text objectives on the embedded shapes data.

``configs/<method>_shapes.py`` call :func:`image_text` and add their own fields. Arguments
(``--config configs/clip_shapes.py:size=tiny,steps=20``):
  size:  ``cpu`` (default: CLIP reaches ≥ 0.90 zero-shot acc1 in minutes on 2 CPU cores) or
         ``tiny`` (seconds; used by the tests).
  steps: total optimizer steps (0: the size's default).
  eval:  1 (default) zero-shot and retrieval evaluation at the end (and every
         ``eval.every_steps``); 0 none.
"""

import math

import ml_collections
from ml_collections import config_dict

from contrastive_jax.config_args import parse_arg


def image_text(arg=None, *, objective: str) -> ml_collections.ConfigDict:
  """The shapes image-text config for ``objective`` (see the module docstring for ``arg``)."""
  arg = parse_arg(arg, size="cpu", steps=0, eval=1)
  tiny = arg.size == "tiny"
  if arg.size not in ("cpu", "tiny"):
    raise ValueError(f"shapes config size={arg.size!r}; expected 'cpu' or 'tiny'.")

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = objective
  c.total_steps = arg.steps or (60 if tiny else 1500)
  c.batch_size = 16 if tiny else 128

  c.data = dict(source="shapes", seed=0, image_size=32 if tiny else 48, min_objects=1,
                max_objects=4, text_key="caption")
  c.tokenizer = dict(name="bytes", context_length=48)

  width = 32 if tiny else 64
  c.model = dict(
      embed_dim=width,
      dtype="float32",  # compute dtype: "bfloat16" keeps float32 parameters and losses
      remat=False,  # recompute encoder blocks in the backward pass (activation memory)
      logit_scale_init=math.log(1 / 0.07),
      image=dict(patch_size=8, width=width, depth=1 if tiny else 3, num_heads=4, pool="cls"),
      text=dict(width=width, depth=1 if tiny else 2, num_heads=4),
  )

  # Rows of local images scored at once by the ring losses (None: the whole local batch).
  c.loss = dict(block_size=config_dict.placeholder(int), ring="auto")  # objectives.base.use_ring

  c.optimizer = dict(learning_rate=3e-3, warmup_steps=5 if tiny else 100, end_factor=0.0,
                     b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0,
                     logit_scale_max=math.log(100.0),
                     skip_nonfinite=False, max_consecutive_nonfinite=10)

  # mode: 'jit' (the model partitioned by the compiler, the loss in shard_map) or 'pmap';
  # fsdp_axis_size: devices sharing each parameter's shards (1: replicated);
  # accum_steps: micro-batches per step, negatives kept global (GradCache).
  c.parallel = dict(mode="jit", data_axis_size=-1, fsdp_axis_size=1, accum_steps=1)
  c.checkpoint = dict(every_steps=20 if tiny else 250, keep=3, async_save=True)
  c.log_every_steps = 10 if tiny else 50
  # metrics.geometry: log uniformity / alignment while training (objectives.base).
  c.metrics = dict(geometry=False)

  test_examples = 256 if tiny else 4096
  evaluators = dict(
      zeroshot=dict(kind="zeroshot", dataset="shapes", split="test",
                    num_examples=test_examples),
      retrieval=dict(kind="retrieval", dataset="shapes", split="test",
                     num_examples=256 if tiny else 1024),
  )
  c.eval = dict(
      every_steps=0 if tiny else 500,  # 0: only at the end
      batch_size=64 if tiny else 256,
      evaluators=evaluators if arg.eval else {},
  )
  return c

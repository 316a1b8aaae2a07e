"""CLIP on real data (TFRecord shards, TFDS), from a CPU smoke run to ViT-B/16 on a pod.

``configs/clip_shards.py`` and ``configs/clip_coco.py`` call :func:`clip`. Arguments
(``--config configs/clip_shards.py:data=/data/cc3m/*.tfrecord,size=cpu,steps=500``):

  size:   ``tiny`` (tests: seconds), ``cpu`` (a small ViT at 64 px: minutes on 2 cores),
          ``b16`` (ViT-B/16 at 224 px, CLIP BPE, 77 tokens, bfloat16: the open_clip
          ViT-B-16 recipe at batch 32768; set ``batch`` to fit your pod).
  steps:  total optimizer steps (0: the size's default).
  batch:  global batch size (0: the size's default).
  vocab:  path of ``bpe_simple_vocab_16e6.txt.gz``: CLIP BPE tokens (required for ``b16``);
          empty: the byte tokenizer.
"""

from __future__ import annotations

import math
from typing import Optional

import ml_collections
from ml_collections import config_dict

from contrastive_jax.config_args import parse_arg

# size -> (image px, batch, steps, patch, width, depth, heads, text width, text depth, text
#          heads, context, embed dim, lr, warmup, dtype)
SIZES = {
    "tiny": (32, 16, 20, 8, 32, 1, 4, 32, 1, 4, 32, 32, 1e-3, 2, "float32"),
    "cpu": (64, 64, 1000, 8, 128, 4, 4, 128, 3, 4, 32, 128, 1e-3, 100, "float32"),
    "b16": (224, 32768, 39_000, 16, 768, 12, 12, 512, 12, 8, 77, 512, 5e-4, 2000, "bfloat16"),
}
ARGS = dict(size="cpu", steps=0, batch=0, vocab="")


def clip(arg, *, data: dict, evaluators: dict,
         extra_args: Optional[dict] = None) -> ml_collections.ConfigDict:
  """A CLIP config on ``data`` (``config.data``) evaluated by ``evaluators``.

  ``extra_args``: the caller's own ``FILE:ARGS`` arguments with their defaults (e.g.
  ``data=``); they are parsed with the common ones and recorded in ``config.args``.
  """
  arg = parse_arg(arg, **ARGS, **(extra_args or {}))
  if arg.size not in SIZES:
    raise ValueError(f"clip config size={arg.size!r}; expected one of {sorted(SIZES)}.")
  (image_size, batch, steps, patch, width, depth, heads, text_width, text_depth, text_heads,
   context, embed, lr, warmup, dtype) = SIZES[arg.size]
  tiny = arg.size == "tiny"

  c = ml_collections.ConfigDict()
  c.args = arg.to_dict()
  c.seed = 0
  c.objective = "clip"
  c.total_steps = arg.steps or steps
  c.batch_size = arg.batch or batch
  # CLIP preprocessing: random resized crop (scale 0.9-1, as open_clip), no flip, CLIP
  # mean/std; shuffle windows of 1024 encoded records per host.
  c.data = dict(dict(seed=0, image_size=image_size, crop_scale=(0.9, 1.0), flip=False,
                     antialias=False,
                     normalization="clip", shuffle_window=16 if tiny else 1024,
                     cycle_length=16, non_rgb="convert", deterministic=True), **data)
  if arg.vocab:
    c.tokenizer = dict(name="clip_bpe", vocab_path=arg.vocab, context_length=context)
  elif arg.size == "b16":
    raise ValueError("size=b16 trains with CLIP BPE tokens: give vocab=PATH of "
                     "bpe_simple_vocab_16e6.txt.gz.")
  else:
    c.tokenizer = dict(name="bytes", context_length=context)

  c.model = dict(
      embed_dim=embed, dtype=dtype, remat=False, logit_scale_init=math.log(1 / 0.07),
      image=dict(patch_size=patch, width=width, depth=depth, num_heads=heads, pool="cls"),
      text=dict(width=text_width, depth=text_depth, num_heads=text_heads),
  )
  c.loss = dict(block_size=config_dict.placeholder(int), ring="auto")  # objectives.base.use_ring
  c.optimizer = dict(learning_rate=lr, warmup_steps=warmup, end_factor=0.0, b1=0.9, b2=0.98,
                     eps=1e-6, weight_decay=0.2 if arg.size == "b16" else 0.1,
                     grad_clip_norm=1.0, logit_scale_max=math.log(100.0),
                     skip_nonfinite=False, max_consecutive_nonfinite=10)
  # mode: 'jit' (the model partitioned by the compiler, the loss in shard_map) or 'pmap';
  # fsdp_axis_size: devices sharing each parameter's shards (1: replicated);
  # accum_steps: micro-batches per step, negatives kept global (GradCache).
  c.parallel = dict(mode="jit", data_axis_size=-1, fsdp_axis_size=1, accum_steps=1)
  c.checkpoint = dict(every_steps=10 if tiny else 500, keep=3, async_save=True)
  c.log_every_steps = 5 if tiny else 50
  c.eval = dict(every_steps=0 if tiny else 1000, batch_size=16 if tiny else 256,
                evaluators=evaluators)
  return c

"""AD-CLIP (METHODS.md §2.16) on shapes: prompt learning on the FROZEN shapes CLIP
(tests/data/clip_shapes_1500.npz, configs/clip_shapes.py trained 1,500 steps) for the shift
from normal scenes (source, labelled) to hazy ones (target, ``0.6·x + 0.3``, unlabelled).

  python -m contrastive_jax.train --config configs/adclip_shapes.py --workdir /tmp/adclip_shapes

The towers are the checkpoint's (``size=cpu`` architecture and 48 px images at every size);
``size=tiny`` only shrinks the batch and the steps. Training logs ``target_acc`` (the hazy
images' labels, never used by the loss). Single-object scenes only (every source image has a
class label). ``model.frozen_params``: any npz of ``/``-flattened two-tower parameters that
matches ``config.model``.
"""

import pathlib

from contrastive_jax import shapes_config
from contrastive_jax.config_args import parse_arg

FROZEN = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "clip_shapes_1500.npz"


def get_config(arg=None):
  tiny = parse_arg(arg, size="cpu", steps=0, eval=1).size == "tiny"
  cpu = shapes_config.image_text(None, objective="clip")  # the checkpoint's architecture
  config = shapes_config.image_text(arg, objective="adclip")
  config.model = cpu.model
  config.model.frozen_params = str(FROZEN)
  config.data = cpu.data
  config.data.min_objects = config.data.max_objects = 1
  config.batch_size = 16 if tiny else 64
  if not tiny and config.total_steps == 1500:
    config.total_steps = 150
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2 if tiny else 10
  config.optimizer.logit_scale_max = None
  config.adclip = dict(target="haze", haze_alpha=0.6, haze_level=0.75, ctx_init=" now",
                       align_weight=0.1, entropy_weight=0.01, kl_weight=0.1)
  # The standard evaluators score the frozen towers (the zero-shot baseline on source scenes).
  config.eval.evaluators = {k: v for k, v in config.eval.evaluators.items() if k == "zeroshot"}
  return config

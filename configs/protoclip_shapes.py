"""ProtoCLIP (METHODS.md §1.4) on the embedded shapes data: CLIP's towers and data plus
episodic k-means prototypes, prototypical back translation and prototype losses.

  python -m contrastive_jax.train --config configs/protoclip_shapes.py --workdir /tmp/protoclip
  python -m contrastive_jax.train --config configs/protoclip_shapes.py:size=tiny \
      --workdir /tmp/protoclip_tiny

Arguments (``:size=cpu|tiny,steps=N``) as :mod:`contrastive_jax.shapes_config`. An episode
clusters the projections of the last ``episode_size`` samples every ``episode_steps`` steps;
the first episode is CLIP only. ``tiny`` (60 steps, batch 16): episodes of 320 samples every
20 steps (3 episodes, 2 with prototypes); ``cpu`` (1500 steps, batch 128): 2048 samples every
150 steps (10 episodes). The external teacher is off (``loss.teacher`` empty).
"""

import math

from contrastive_jax import shapes_config
from contrastive_jax.config_args import parse_arg


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="protoclip")
  tiny = parse_arg(arg, size="cpu", steps=0).size == "tiny"
  config.loss.update(
      num_clusters=16 if tiny else 32,
      proj_dim=32 if tiny else 64,
      episode_size=320 if tiny else 2048,
      episode_steps=20 if tiny else 150,
      kmeans_iterations=10 if tiny else 20,
      teacher_temperature=0.01,
      clip_weight=1.0,
      proto_weight=1.0,
      back_translation=True,
      proto_scale_init=math.log(1 / 0.07),  # clamped at ln 100 like CLIP's scale
      external_weight=0.0,
      teacher="",  # "package.module:factory" of a frozen text encoder (none ships)
      teacher_clusters=0,  # 0: num_clusters
  )
  return config

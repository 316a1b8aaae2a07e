"""SigLIP (METHODS.md §1.2) on the embedded shapes data: CLIP's towers and data, the pairwise
sigmoid loss, scale initialised at 10 (θ = ln 10) and bias at −10, no clamp on the scale.

  python -m contrastive_jax.train --config configs/siglip_shapes.py --workdir /tmp/siglip_shapes
"""

import math

from contrastive_jax import shapes_config


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="siglip")
  config.model.logit_scale_init = math.log(10.0)
  config.model.logit_bias_init = -10.0
  config.optimizer.logit_scale_max = None  # SigLIP does not clamp its learnable scale.
  return config

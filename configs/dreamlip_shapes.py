"""DreamLIP (METHODS.md §1.5) on the embedded shapes data: CLIP's towers and data; every image
also gets K = 3 sentences sampled from its long caption, a multi-positive image→text InfoNCE
over all raw + sampled captions and the sub-caption-specific grouping loss on patch tokens
(its own learnable scale, clamped like CLIP's). CLIP's term is divided by T = K + 1.

  python -m contrastive_jax.train --config configs/dreamlip_shapes.py --workdir /tmp/dreamlip_shapes

``loss.multi_positive_form="circle"`` switches to the released code's Circle-loss form.
"""

import math

from contrastive_jax import shapes_config


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="dreamlip")
  config.data.subcaptions = dict(num_subcaptions=3, key="long_caption")
  config.model.logit_scale_local_init = math.log(1 / 0.07)
  config.loss.multi_positive_weight = 1.0
  config.loss.multi_positive_form = "infonce"
  config.loss.grouping_weight = 1.0
  config.loss.delta = 0.0
  return config

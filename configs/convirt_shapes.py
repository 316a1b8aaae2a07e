"""ConVIRT (METHODS.md §1.15) on the embedded shapes data: CLIP's towers and data, a fixed
temperature τ = 0.1 and the image→text direction weighted λ = 0.75.

  python -m contrastive_jax.train --config configs/convirt_shapes.py --workdir /tmp/convirt_shapes
"""

from contrastive_jax import shapes_config


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="convirt")
  config.loss.temperature = 0.1
  config.loss.i2t_weight = 0.75
  return config

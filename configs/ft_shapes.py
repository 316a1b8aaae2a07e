"""MoCo-v2 with Feature Transformation (FT, METHODS.md §2.10) on the embedded shapes images.

  python -m contrastive_jax.train --config configs/ft_shapes.py --workdir /tmp/ft_shapes

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="ft", dataset="shapes")

"""SBCL (subclass-balancing contrastive learning) on the labelled single-object shapes scenes.

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="sbcl", dataset="shapes")

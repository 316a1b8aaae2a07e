"""Hydra (SimLAP) on the embedded shapes images: single-object scenes, 64 colour × shape
classes (no data needed).

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="hydra", dataset="shapes")

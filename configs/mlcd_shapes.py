"""MLCD (multi-label cluster discrimination) on the embedded shapes images (no data needed).

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="mlcd", dataset="shapes")

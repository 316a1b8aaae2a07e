"""SupReMix on the embedded shapes images: contrastive regression of the object's box area
(``config.data.regression_target='size'``; ``'x'`` / ``'y'``: its centre), single-object
scenes (no data needed).

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="supremix", dataset="shapes")

"""CACR (contrastive attraction and repulsion; 4 views, 3 at size=tiny) on Fashion-MNIST
(size=cpu: the benchmark run).

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="cacr", dataset="fashion_mnist")

"""MLCD, multi-label cluster discrimination (METHODS.md §1.13) on Fashion-MNIST.

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="mlcd", dataset="fashion_mnist")

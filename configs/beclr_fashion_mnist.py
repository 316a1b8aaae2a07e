"""BECLR with its DyCE memory (METHODS.md §1.14) on Fashion-MNIST.

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="beclr", dataset="fashion_mnist")

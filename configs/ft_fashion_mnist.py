"""MoCo-v2 with Feature Transformation (FT, METHODS.md §2.10) on Fashion-MNIST.

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="ft", dataset="fashion_mnist")

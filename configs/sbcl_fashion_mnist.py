"""SBCL, subclass-balancing contrastive learning (METHODS.md §2.36; uses the labels) on Fashion-MNIST.

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="sbcl", dataset="fashion_mnist")

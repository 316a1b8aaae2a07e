"""GroCo (learning by sorting, k = 10 hardest negatives, β = 1) on Fashion-MNIST
(size=cpu: the benchmark run).

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  return image_only(arg, objective="groco", dataset="fashion_mnist")

"""SimCLR with Batch Styles Standardization (BSS, METHODS.md §2.9) on Fashion-MNIST.

``config.loss.bss_ratio`` r: area ratio of the swapped low-frequency box (0: plain SimCLR).
Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  config = image_only(arg, objective="simclr", dataset="fashion_mnist")
  config.loss.bss_ratio = 0.05  # [unverified] value (see configs/simclr_bss_shapes.py)
  return config

"""SimCLR with Batch Styles Standardization (BSS, METHODS.md §2.9) on the shapes images: each
view's rows on a device share the low-frequency Fourier amplitude of one random image of them.

  python -m contrastive_jax.train --config configs/simclr_bss_shapes.py --workdir /tmp/simclr_bss

``config.loss.bss_ratio`` r: area ratio of the swapped low-frequency box (0: plain SimCLR).
Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  config = image_only(arg, objective="simclr", dataset="shapes")
  config.loss.bss_ratio = 0.05  # [unverified] value: a 7×7 of 32×32 box at size=tiny
  return config

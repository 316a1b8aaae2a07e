"""SLIP (METHODS.md §1.16) on the embedded shapes data: CLIP's towers and loss plus SimCLR's
NT-Xent (τ = 0.1, weight c_ssl = 1) on two augmented, image-only views through the same image
tower and an MLP head.

  python -m contrastive_jax.train --config configs/slip_shapes.py --workdir /tmp/slip_shapes

Arguments (``:size=tiny,steps=20``) as :mod:`contrastive_jax.shapes_config`. The SSL views use
SimCLR's recipe (crop 0.08–1, flip, colour jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale
0.2, blur 0.5) with the blur's σ scaled down for the small images; the CLIP branch keeps the
pipeline's unaugmented image, whose caption names positions and colours.
"""

from contrastive_jax import shapes_config


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="slip")
  width = config.model.embed_dim
  config.data.views = dict(ssl=dict(
      num=2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True, jitter=(0.4, 0.4, 0.4, 0.1),
      jitter_p=0.8, gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 1.0)))
  config.model.ssl_head = dict(hidden=2 * width, dim=width, layers=3)
  config.loss.ssl_scale = 1.0
  config.loss.ssl_temperature = 0.1
  return config

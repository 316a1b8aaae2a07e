"""CLIP on the embedded shapes data: the spine's main job, sized for a 2-core CPU.

  python -m contrastive_jax.train --config configs/clip_shapes.py --workdir /tmp/clip_shapes

Arguments (``--config configs/clip_shapes.py:size=tiny,steps=20``): ``size=cpu|tiny`` and
``steps=N``; see :mod:`contrastive_jax.shapes_config`.
"""

from contrastive_jax import shapes_config


def get_config(arg=None):
  return shapes_config.image_text(arg, objective="clip")

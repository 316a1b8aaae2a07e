"""FILIP (METHODS.md §1.3) on the embedded shapes data: CLIP's towers and data, the token-wise
late-interaction loss on projected patch and text tokens, evaluated with late-interaction
scores (zero-shot: averaged over each class's prompts).

  python -m contrastive_jax.train --config configs/filip_shapes.py --workdir /tmp/filip_shapes

``keep_image_tokens`` below 1 turns on the paper's token reduction (a random fraction of
every image's patch tokens per step).
"""

from contrastive_jax import shapes_config


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="filip")
  config.loss.keep_image_tokens = 1.0
  config.eval.scoring = "late_interaction"
  return config

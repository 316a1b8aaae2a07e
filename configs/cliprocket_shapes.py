"""CLIP🚀 / CL2L (METHODS.md §1.16) on the embedded shapes data: CLIP's global term plus local
terms between n_aug = 2 augmented crops and 2 augmented captions through separate MLP
projectors with their own scale, label smoothing 0.1 on the local terms only.

  python -m contrastive_jax.train --config configs/cliprocket_shapes.py \
      --workdir /tmp/cliprocket_shapes

Arguments (``:size=tiny,steps=20``) as :mod:`contrastive_jax.shapes_config`. The local crops
are paired with captions that name positions and colours, so they are mild (area 0.6–1), not
flipped, and keep their hue (no hue jitter, no grayscale). Captions lose each word with
p = 0.1 and each stop word with p = 0.8 (the reference's ``--remove-stopwords-prob``).
"""

from ml_collections import config_dict

from contrastive_jax import shapes_config
from contrastive_jax.objectives.cliprocket import LOCAL_LOGIT_SCALE_INIT


def get_config(arg=None):
  config = shapes_config.image_text(arg, objective="cliprocket")
  width = config.model.embed_dim
  config.data.views = dict(
      local=dict(num=2, size=config_dict.placeholder(int), scale=(0.6, 1.0),
                 ratio=(3 / 4, 4 / 3), flip=False, jitter=(0.4, 0.4, 0.2, 0.0), jitter_p=0.8,
                 gray_p=0.0, blur_p=0.5, blur_sigma=(0.1, 1.0)),
      text=dict(num=2, dropout=0.1, stopword_p=0.8, clean=True))
  config.model.local_head = dict(hidden=2 * width, layers=3,
                                 logit_scale_init=LOCAL_LOGIT_SCALE_INIT)
  config.loss.label_smoothing = 0.1
  config.loss.reduction = "mean"  # "sum": twice the loss (the reference's recipe flag)
  return config

"""CLIP on COCO captions from TFDS (prepared beforehand; training never downloads).

  tfds build coco_captions --data_dir ~/tensorflow_datasets   # once
  python -m contrastive_jax.train --config configs/clip_coco.py:size=cpu --workdir /tmp/clip_coco

Trains on ``train`` (one of each image's captions, drawn anew every epoch) and evaluates
image<->text retrieval on the first ``eval_examples`` images of ``val`` with all of their
(up to five) captions. Arguments: ``eval_examples`` (default 1000), plus ``size``, ``steps``,
``batch``, ``vocab`` of :mod:`contrastive_jax.clip_config`; ``$TFDS_DATA_DIR`` or
``data_dir=`` say where the prepared dataset is.
"""

from contrastive_jax import clip_config
from contrastive_jax.config_args import parse_arg

EXTRA = dict(eval_examples=1000, data_dir="")


def get_config(arg=None):
  args = parse_arg(arg, **clip_config.ARGS, **EXTRA)
  data = dict(source="tfds", name="coco_captions", split="train",
              data_dir=args.data_dir or None)
  evaluators = dict(retrieval=dict(kind="retrieval", dataset="tfds", split="val",
                                   num_examples=args.eval_examples, num_captions=5))
  return clip_config.clip(arg, data=data, evaluators=evaluators, extra_args=EXTRA)

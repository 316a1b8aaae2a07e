"""CLIP on image-text TFRecord shards (img2dataset layout, or `make_shards` output).

  python -m contrastive_jax.train --workdir /tmp/clip_shards --config \
    'configs/clip_shards.py:data=/data/cc3m/train/*.tfrecord,eval_data=/data/cc3m/val/*.tfrecord'

Arguments: ``data`` (glob of training shards, local or gs://; required), ``eval_data`` (glob
of held-out shards for retrieval; empty: no evaluation), ``eval_examples`` (default 1000),
plus ``size``, ``steps``, ``batch``, ``vocab`` of :mod:`contrastive_jax.clip_config`.
"""

from contrastive_jax import clip_config
from contrastive_jax.config_args import parse_arg

EXTRA = dict(data="", eval_data="", eval_examples=1000)


def get_config(arg=None):
  args = parse_arg(arg, **clip_config.ARGS, **EXTRA)
  if not args.data:
    raise ValueError("configs/clip_shards.py needs data=GLOB of the training shards, e.g. "
                     "--config 'configs/clip_shards.py:data=/data/cc3m/*.tfrecord'.")
  evaluators = {}
  if args.eval_data:
    evaluators["retrieval"] = dict(kind="retrieval", dataset="shards", shards=args.eval_data,
                                   num_examples=args.eval_examples)
  return clip_config.clip(arg, data=dict(source="shards", shards=args.data, image_key="jpg",
                                         text_key="txt"),
                          evaluators=evaluators, extra_args=EXTRA)

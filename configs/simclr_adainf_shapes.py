"""SimCLR with AdaInf data inflation (METHODS.md §2.23) on the shapes images: a finite real set
replicated ``dup`` times among degraded scenes of a second shapes stream (the "generated"
data; contrastive_jax/data/inflation.py), with AdaInf's weaker augmentation.

  python -m contrastive_jax.train --config configs/simclr_adainf_shapes.py --workdir /tmp/adainf

Arguments and shared settings: contrastive_jax/ssl_config.py.
"""

from ml_collections import config_dict

from contrastive_jax.config_args import parse_arg
from contrastive_jax.ssl_config import image_only


def get_config(arg=None):
  config = image_only(arg, objective="simclr", dataset="shapes")
  tiny = parse_arg(arg, size="cpu", steps=0).size == "tiny"
  num_real = 64 if tiny else 1024
  # AdaInf on CIFAR-10: 50k real x dup 10 next to 1M generated (a third of the stream real).
  config.data.inflation = dict(num_real=num_real, num_generated=20 * num_real, dup=10,
                               generated_seed=config_dict.placeholder(int),  # None: data seed + 1
                               degrade=2)
  config.data.views.ssl.update(scale=(0.2, 1.0), jitter_p=0.4)  # AdaInf's weaker views
  return config

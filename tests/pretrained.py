"""A trained image-text model for tests that need one: configs/clip_shapes.py as shipped,
trained 1,500 steps (tests/data/clip_shapes_1500.npz, written by
tests/data/make_clip_shapes_params.py; 0.96 zero-shot acc1 on shapes)."""

import functools

import numpy as np
from flax import traverse_util

from conftest import REPO
from contrastive_jax import shapes_config, train
from contrastive_jax.evaluate import embedding

PARAMS = REPO / "tests" / "data" / "clip_shapes_1500.npz"


@functools.lru_cache(maxsize=1)
def clip_shapes():
  """``(config, tokenizer, objective, mesh, variables, encoders)`` of the trained model
  (``encoders``: :func:`contrastive_jax.evaluate.embedding.jitted_encoders`)."""
  config = shapes_config.image_text("size=cpu", objective="clip")
  tokenizer, objective, mesh, _ = train.build(config)
  with np.load(PARAMS) as f:
    params = traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
  variables = {"params": params}
  return config, tokenizer, objective, mesh, variables, embedding.jitted_encoders(objective.model)

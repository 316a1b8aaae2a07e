"""Writes tests/data/clip_shapes_1500.npz: the parameters of configs/clip_shapes.py trained as
shipped (1,500 steps, seed 0; 0.96 zero-shot acc1 on shapes), for tests that need a trained
image-text model (dense score maps, training-free adaptation) without training one.

  python tests/data/make_clip_shapes_params.py --workdir /tmp/clip_shapes

trains into ``--workdir`` unless it already holds the step-1500 checkpoint, then exports the
parameters flattened with ``/`` (float32, ``np.savez_compressed``).
"""

import argparse
import os
import pathlib

import jax
import numpy as np
from flax import traverse_util

from contrastive_jax import shapes_config, train

OUT = pathlib.Path(__file__).resolve().parent / "clip_shapes_1500.npz"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  config = shapes_config.image_text("size=cpu", objective="clip")
  checkpoints = os.path.join(args.workdir, "checkpoints")
  if not os.path.isdir(os.path.join(checkpoints, str(config.total_steps))):
    train.train_and_evaluate(config, args.workdir)
  *_, variables, step = train.restore_variables(config, checkpoints, config.total_steps)
  flat = traverse_util.flatten_dict(jax.device_get(variables["params"]), sep="/")
  np.savez_compressed(OUT, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
  print(f"step {step}: {sum(v.size for v in flat.values()):,} parameters -> {OUT}")


if __name__ == "__main__":
  main()

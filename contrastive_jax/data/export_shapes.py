"""Writes shapes scenes as image files + a captions CSV: a stand-in for your own data.

  python -m contrastive_jax.data.export_shapes --output_dir /tmp/shapes_files --num_examples 512

produces ``/tmp/shapes_files/images/000000.jpg, ...`` and ``/tmp/shapes_files/captions.csv``
with open_clip's columns (``filepath`` relative to the CSV, ``title``), which
``python -m contrastive_jax.data.make_shards`` turns into TFRecord shards. Scenes of
``split="train"`` are used; ``--split test`` exports the held-out scenes.
"""

from __future__ import annotations

import csv
import os

from absl import app, flags
import tensorflow as tf

from contrastive_jax.data import shapes


def export(output_dir: str, *, num_examples: int, split: str = "train", image_size: int = 64,
           seed: int = 0) -> str:
  """Writes the files; returns the CSV's path."""
  os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
  path = os.path.join(output_dir, "captions.csv")
  ds = shapes.dataset(split, seed=seed, image_size=image_size, num_examples=num_examples)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["filepath", "title"])
    for i, example in enumerate(ds.as_numpy_iterator()):
      name = os.path.join("images", f"{i:06d}.jpg")
      with open(os.path.join(output_dir, name), "wb") as image_file:
        image_file.write(tf.io.encode_jpeg(example["image"], quality=95).numpy())
      writer.writerow([name, example["caption"].decode()])
  return path


def main():
  out = flags.DEFINE_string("output_dir", None, "Directory for images/ and captions.csv.")
  num = flags.DEFINE_integer("num_examples", 512, "Scenes to export.")
  split = flags.DEFINE_enum("split", "train", list(shapes.SPLITS), "Scenes of this split.")
  size = flags.DEFINE_integer("image_size", 64, "Image side in pixels (32 to 64).")
  flags.mark_flag_as_required("output_dir")

  def run(argv):
    del argv
    print(export(out.value, num_examples=num.value, split=split.value, image_size=size.value))

  app.run(run)


if __name__ == "__main__":
  main()

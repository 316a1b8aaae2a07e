"""Data inflation with generated images, AdaInf style (Wang, Zhang, Wang, ICLR 2024), §2.23.

AdaInf trains a contrastive learner on real data *inflated* by samples of a generative model
(e.g. 1M diffusion images next to CIFAR-10's 50k), and makes inflation help by (i) re-weighting
the real data, replicating it ``dup`` times (the reference uses ``dup = 10``), and (ii) using
weaker augmentation (random-resized-crop min scale 0.2, colour-jitter probability 0.4). The
loss is unchanged.

What stands in for the generated data here: a second shapes stream, drawn from the shapes
generator with its own seed (``generated_seed``), so its scenes are new, and degraded by a
down- and up-sampling by ``degrade`` (bilinear), which loses detail as an imperfect generative
model does: the generated images come from a nearby but not identical distribution, the
"distribution gap" of the paper. The real data is a finite set of ``num_real`` shapes scenes
(the data seed's scenes ``[0, num_real)``).

Sampling: one epoch is the multiset of ``dup`` copies of every real scene and ``num_generated``
generated scenes, ``N = dup·num_real + num_generated`` slots, read in a fresh stateless
permutation every epoch (:func:`contrastive_jax.data.fashion_mnist.shuffled_row`); the real
fraction of the stream is ``dup·num_real / N``. Batches carry ``index`` = the real scene's
index (``< num_real``) or ``num_real +`` the generated scene's index, so an objective can tell
the sources apart; views are keyed by the stream position (new views every epoch).

``config.data.inflation``: ``num_real``, ``num_generated``, ``dup`` (10), ``generated_seed``
(the data seed + 1 when None), ``degrade`` (2; 1: no degradation). Weaker augmentation is set
in ``config.data.views.ssl`` (``scale=(0.2, 1.0)``, ``jitter_p=0.4``). Shapes source only.
"""

from __future__ import annotations

from typing import Any, Mapping

import tensorflow as tf

from contrastive_jax.data import fashion_mnist, shapes


def settings(data_config: Mapping[str, Any]) -> dict:
  """``config.data.inflation`` with defaults, checked."""
  inf = dict(data_config.get("inflation") or {})
  if data_config.get("source", "shapes") != "shapes":
    raise ValueError("config.data.inflation needs config.data.source='shapes'.")
  out = dict(num_real=inf.get("num_real"), num_generated=inf.get("num_generated"),
             dup=inf.get("dup", 10), degrade=inf.get("degrade", 2),
             generated_seed=inf.get("generated_seed"))
  for name in ("num_real", "num_generated", "dup", "degrade"):
    v = out[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_generated" else 1):
      raise ValueError(f"config.data.inflation.{name}={v!r}; expected a positive int.")
  if out["generated_seed"] is None:
    out["generated_seed"] = data_config.get("seed", 0) + 1
  return out


def slot(position, *, num_real: int, num_generated: int, dup: int, seed: int):
  """Which example stream position ``position`` reads.

  Returns:
    ``(generated, row)``: bool scalar (a generated scene) and int64 scalar (the scene index
    within its source).
  """
  num_slots = dup * num_real + num_generated
  s = fashion_mnist.shuffled_row(position, num_slots, seed)
  real_slots = tf.constant(dup * num_real, tf.int64)
  generated = s >= real_slots
  row = tf.where(generated, s - real_slots, s % num_real)
  return generated, row


def example_fn(data_config: Mapping[str, Any]):
  """``int64 position -> raw example`` of the inflated stream (see the module docstring)."""
  inf = settings(data_config)
  seed = data_config.get("seed", 0)
  kw = dict(image_size=data_config.image_size, min_objects=data_config.min_objects,
            max_objects=data_config.max_objects)
  real_fn = shapes.example_fn("train", seed=seed, **kw)
  gen_fn = shapes.example_fn("train", seed=inf["generated_seed"], **kw)
  size, small = data_config.image_size, max(data_config.image_size // inf["degrade"], 1)

  def degrade(image):
    if inf["degrade"] == 1:
      return image
    x = tf.image.resize(tf.cast(image, tf.float32), [small, small], method="bilinear",
                        antialias=True)
    x = tf.image.resize(x, [size, size], method="bilinear")
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)

  def generated_example(row):
    ex = gen_fn(row)
    return dict(ex, image=degrade(ex["image"]),
                index=tf.cast(row, tf.int64) + inf["num_real"])

  def fn(position):
    position = tf.cast(position, tf.int64)
    generated, row = slot(position, num_real=inf["num_real"],
                          num_generated=inf["num_generated"], dup=inf["dup"], seed=seed)
    ex = tf.cond(generated, lambda: generated_example(row), lambda: real_fn(row))
    ex["index"] = tf.cast(ex["index"], tf.int64)
    ex["position"] = position
    return ex

  return fn


"""Throughput of the tf.data input pipeline on this machine's CPUs.

Part 1 (``decode``): images/s of decode + random resized crop + flip + CLIP normalisation
(``contrastive_jax.data.image_ops``) on synthetic 500 x 375 JPEGs held in memory (so it
measures decoding, not disk), on one core (a private tf.data thread pool of 1 thread,
``num_parallel_calls=1``, no intra-op parallelism) and on all cores (``AUTOTUNE``), for:

* ``decode_crop``: the training path, ``tf.io.decode_and_crop_jpeg`` decodes only the window;
* ``full_decode``: the naive path, decode the whole image then crop (same windows);
* ``decode_crop_no_antialias``: the training path without the antialiasing filter of the
  resize (big_vision's ``inception_crop``; torchvision and PIL do antialias);
* ``center_crop``: the evaluation path (decode, shorter side to ``size``, central crop).

Each row reports the best of ``--rounds`` interleaved rounds (robust to a shared machine's
load). Prints a table and writes (merges) JSON under the key ``decode``.

Part 2 (``input_wait``): the fraction of training step time spent waiting for input, CLIP of
``configs/clip_shards.py`` (``--wait_size``, ``--wait_batch``, ``--wait_image_size``) on
TFRecord shards of the same synthetic JPEGs through the real training pipeline (window
shuffle, crop, tokenization, bad-record accounting, prefetch). Key
``input_wait_<size>_<pixels>px``.

  python benchmarks/input_pipeline.py --num_images 512 --size 224 --seconds 12 \\
      --output benchmarks/results/input_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import tensorflow as tf

from contrastive_jax.data import image_ops

VARIANTS = ("decode_crop", "full_decode", "decode_crop_no_antialias", "center_crop")
BATCH = 32


def synthetic_image(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
  """uint8 ``[height, width, 3]``: smooth random fields at several scales, a few flat shapes
  with sharp edges, and pixel noise (a photo's mix of gradients, edges and texture)."""
  image = np.zeros((height, width, 3), np.float32)
  for cells, amplitude in [(3, 70), (8, 40), (24, 20), (80, 10), (160, 8)]:
    grid = rng.normal(size=(cells, int(cells * width / height) + 1, 3)).astype(np.float32)
    image += amplitude * tf.image.resize(grid, [height, width], "bicubic").numpy()
  yy, xx = np.mgrid[:height, :width]
  for _ in range(rng.integers(4, 9)):
    if rng.random() < 0.5:
      y0, x0 = rng.integers(0, height), rng.integers(0, width)
      mask = ((yy >= y0) & (yy < y0 + rng.integers(20, height // 2))
              & (xx >= x0) & (xx < x0 + rng.integers(20, width // 2)))
    else:
      cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(10, height // 3)
      mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    image[mask] += rng.uniform(-90, 90, 3)
  image += rng.normal(scale=6.0, size=image.shape)
  return np.clip(image + 128, 0, 255).astype(np.uint8)


def synthetic_jpegs(num: int, height: int = 375, width: int = 500, quality: int = 90,
                    seed: int = 0) -> list:
  """``num`` deterministic JPEG byte strings (about 60 KB each at 500 x 375, quality 90)."""
  rng = np.random.default_rng(seed)
  return [tf.io.encode_jpeg(synthetic_image(rng, height, width), quality=quality).numpy()
          for _ in range(num)]


def preprocess_fn(variant: str, size: int):
  """``(index, encoded) -> float32 [size, size, 3]`` for one of :data:`VARIANTS`."""
  def fn(index, encoded):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.stack([index, tf.constant(0, tf.int64)]), 2))
    if variant == "center_crop":
      return image_ops.normalize(image_ops.resize_center_crop(encoded, size), "clip")
    image = image_ops.random_resized_crop(encoded, size, crop_seed,
                                          decode_crop=variant != "full_decode",
                                          antialias=variant != "decode_crop_no_antialias")
    return image_ops.normalize(image_ops.random_flip(image, flip_seed), "clip")
  return fn


def decode_dataset(encoded: list, variant: str, size: int, one_core: bool) -> tf.data.Dataset:
  """An endless pipeline over the in-memory encoded images, batched by :data:`BATCH`."""
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat().enumerate()
  ds = ds.map(preprocess_fn(variant, size),
              num_parallel_calls=1 if one_core else tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(BATCH, drop_remainder=True).prefetch(2 if one_core else tf.data.AUTOTUNE)
  options = tf.data.Options()
  if one_core:
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def measure(ds: tf.data.Dataset, seconds: float, warmup_batches: int = 8) -> float:
  """Images per second over ``seconds`` after ``warmup_batches``."""
  it = iter(ds)
  for _ in range(warmup_batches):
    next(it)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    images += int(next(it).shape[0])
  return images / (time.perf_counter() - start)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_decode(num_images: int, size: int, seconds: float, variants=VARIANTS,
               rounds: int = 3) -> dict:
  """Part 1: decode + crop throughput per variant, on one core and on all cores.

  Each (variant, threads) row is timed in ``rounds`` rounds of ``seconds / rounds`` seconds,
  interleaved with the other rows (a fresh, warmed-up pipeline each time), and reports the
  best round: on a shared machine the others are slowed down by the neighbours' load, and
  interleaving spreads that load over all rows alike.
  """
  encoded = synthetic_jpegs(num_images)
  cores = os.cpu_count() or 1
  load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
  configs = [(variant, one_core) for variant in variants for one_core in (True, False)]
  rates = {config: [] for config in configs}
  for _ in range(rounds):
    for variant, one_core in configs:
      ds = decode_dataset(encoded, variant, size, one_core)
      rates[(variant, one_core)].append(measure(ds, seconds / rounds))
  rows = []
  for (variant, one_core), values in rates.items():
    threads = 1 if one_core else cores
    rows.append({"variant": variant, "threads": threads,
                 "images_per_s": round(max(values), 1),
                 "images_per_s_per_core": round(max(values) / threads, 1),
                 "rounds": [round(v, 1) for v in values]})
  return {"cpu": cpu_name(), "cores": cores, "tensorflow": tf.__version__,
          "num_images": num_images, "image_shape": [375, 500, 3], "jpeg_quality": 90,
          "mean_jpeg_kb": round(float(np.mean([len(e) for e in encoded])) / 1e3, 1),
          "size": size, "batch": BATCH, "seconds": seconds, "rounds": rounds,
          "load_average_before": load, "rows": rows}


def print_decode(result: dict) -> None:
  print(f"{result['cpu']}, {result['cores']} core(s), TF {result['tensorflow']}; "
        f"{result['num_images']} JPEGs of 500x375, mean {result['mean_jpeg_kb']} KB, "
        f"-> {result['size']}px; load average before {result['load_average_before']}")
  by = {(r["variant"], r["threads"]): r["images_per_s"] for r in result["rows"]}
  cores = result["cores"]
  print(f"| path | images/s, 1 core | images/s, {cores} cores | per core, {cores} cores |")
  print("|---|---|---|---|")
  for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
    one, many = by[(variant, 1)], by[(variant, cores)]
    print(f"| {variant} | {one:.0f} | {many:.0f} | {many / cores:.0f} |")
  if ("decode_crop", 1) in by and ("full_decode", 1) in by:
    print(f"decode_and_crop_jpeg speed-up over full decode (1 core): "
          f"{by[('decode_crop', 1)] / by[('full_decode', 1)]:.2f}x")


def write_results(path: str, key: str, value) -> None:
  """Sets ``key`` in the JSON object at ``path`` (other keys, e.g. other parts, are kept)."""
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results[key] = value
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")


def write_jpeg_shards(directory: str, num_images: int, *, per_shard: int = 64) -> str:
  """Shards of synthetic 500 x 375 JPEGs with captions (``make_shards.write_shards``)."""
  from contrastive_jax.data import make_shards
  jpegs = synthetic_jpegs(num_images)
  records = ((f"{i:06d}", jpeg, f"synthetic photo number {i}") for i, jpeg in enumerate(jpegs))
  make_shards.write_shards(records, directory, examples_per_shard=per_shard)
  return os.path.join(directory, "*.tfrecord")


def run_input_wait(num_images: int, steps: int, size: str, batch: int, image_size: int,
                   workdir: str, alone_seconds: float = 10.0) -> dict:
  """Fraction of training step time spent waiting for input: ``configs/clip_shards.py`` at
  ``size`` on shards of synthetic JPEGs, the trainer's jitted step on every device; per step,
  the time blocked in ``next(batches)`` (tf.data prefetches in the background, so this is the
  input stall) over the whole step time (the step is waited for, as a step-bound trainer
  would)."""
  import functools
  import importlib.util
  import jax
  from contrastive_jax import parallel, train, train_state
  from contrastive_jax.data import pipeline, records

  pattern = write_jpeg_shards(os.path.join(workdir, "shards"), num_images)
  spec = importlib.util.spec_from_file_location(
      "clip_shards", os.path.join(os.path.dirname(__file__), "..", "configs", "clip_shards.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"data={pattern},size={size},batch={batch},steps={steps}")
  config.data.image_size = image_size
  tokenizer, objective, mesh, optimizer = train.build(config)
  batches = pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer))
  first, _ = records.pop_bookkeeping(next(batches))
  state = train.initial_state(config, objective, optimizer, first, mesh)
  step_fn = parallel.map_step(functools.partial(train_state.train_step, objective=objective,
                                                optimizer=optimizer), mesh, "jit")
  state, metrics = step_fn(state, first)  # compile
  jax.block_until_ready(metrics)
  waits, totals = [], []
  for _ in range(steps):
    start = time.perf_counter()
    rows, _ = records.pop_bookkeeping(next(batches))
    got = time.perf_counter()
    state, metrics = step_fn(state, rows)
    jax.block_until_ready(metrics)
    waits.append(got - start)
    totals.append(time.perf_counter() - start)
  skip = min(5, steps // 4)  # the first steps fill the prefetch buffers
  wait, total = float(np.sum(waits[skip:])), float(np.sum(totals[skip:]))
  # The pipeline alone (no train step competing for the cores): its headroom over the step.
  start, read = time.perf_counter(), 0
  while time.perf_counter() - start < alone_seconds:
    read += len(next(batches)["image"])
  pipeline_rate = read / (time.perf_counter() - start)
  return {"config": f"clip_shards size={size}", "batch": batch, "image_size": image_size,
          "devices": jax.device_count(), "steps_timed": steps - skip,
          "step_ms": 1000 * total / (steps - skip), "wait_ms": 1000 * wait / (steps - skip),
          "wait_fraction": wait / total,
          "images_per_s": batch * (steps - skip) / total,
          "pipeline_alone_images_per_s": pipeline_rate}


GOAL_IMAGES_PER_S_PER_CORE = 1000.0  # decode + random resized crop to 224 px, one core
GOAL_WAIT_FRACTION = 0.05


def run(quick: bool = False, *, workdir: str | None = None) -> dict:
  """The training decode path's images/s per core and the input-wait fraction of a training
  run, as one JSON-serialisable dict (the entry of ``benchmarks/run.py``)."""
  tf.config.set_visible_devices([], "GPU")
  # The training default: decode only the crop window, bilinear resize without antialiasing
  # (config.data.antialias=False).
  decode = run_decode(32 if quick else 256, 224, 0.5 if quick else 8.0,
                      ("decode_crop_no_antialias",), 1 if quick else 2)
  one_core = next(r for r in decode["rows"] if r["threads"] == 1)
  with tempfile.TemporaryDirectory() as tmp:
    wait = run_input_wait(32 if quick else 256, 6 if quick else 40, "tiny" if quick else "cpu",
                          16 if quick else 64, 32 if quick else 64, workdir or tmp,
                          alone_seconds=0.5 if quick else 8.0)
  return {"decode": decode, "input_wait": wait,
          "images_per_s_per_core": one_core["images_per_s"],
          "goal_images_per_s_per_core": GOAL_IMAGES_PER_S_PER_CORE,
          "wait_fraction": wait["wait_fraction"], "goal_wait_fraction": GOAL_WAIT_FRACTION,
          "met": (one_core["images_per_s"] >= GOAL_IMAGES_PER_S_PER_CORE
                  and wait["wait_fraction"] <= GOAL_WAIT_FRACTION)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per row")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--output", default="benchmarks/results/input_pipeline_cpu.json")
  parser.add_argument("--parts", default="decode,input_wait")
  parser.add_argument("--wait_steps", type=int, default=60, help="input_wait: timed steps")
  parser.add_argument("--wait_size", default="cpu", help="input_wait: clip_config size")
  parser.add_argument("--wait_batch", type=int, default=64, help="input_wait: global batch")
  parser.add_argument("--wait_image_size", type=int, default=64, help="input_wait: pixels")
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")
  parts = args.parts.split(",")
  if "decode" in parts:
    result = run_decode(args.num_images, args.size, args.seconds, args.variants.split(","),
                        args.rounds)
    print_decode(result)
    if args.output:
      write_results(args.output, "decode", result)
  if "input_wait" in parts:
    with tempfile.TemporaryDirectory() as workdir:
      result = run_input_wait(args.num_images, args.wait_steps, args.wait_size,
                              args.wait_batch, args.wait_image_size, workdir)
    print(json.dumps(result, indent=2))
    if args.output:
      write_results(args.output, f"input_wait_{args.wait_size}_{args.wait_image_size}px", result)


if __name__ == "__main__":
  main()

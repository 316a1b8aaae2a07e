"""CLIP_benchmark-style evaluation of one model: tasks × TFDS datasets -> result files.

Tasks (:data:`TASKS`), on TFDS datasets read without downloading (issue 5's ``tfds`` source,
images resized and centre-cropped at the model's resolution and normalised its way):

* ``zeroshot``: classifier = normalised mean of each class's normalised prompt embeddings
  (:mod:`prompts` class names and templates), ``acc1``, ``acc5`` (≥ 5 classes),
  ``mean_per_class_recall`` on the test split;
* ``linear_probe``: logistic regression on frozen train features, L2 chosen on a validation
  part of train, refit, test (:mod:`linear_probe`);
* ``knn``: weighted cosine kNN (:mod:`knn`); ``fewshot``: ``shots`` images per class,
  class-mean prototypes (:mod:`fewshot`); ``gda``: the training-free Gaussian discriminant
  adapter ensembled with zero-shot (:mod:`gda`), ``shots`` per class, α chosen on another
  ``shots`` per class;
* ``retrieval``: image↔text recall@K with every caption of an image (up to 5):
  ``coco_captions`` (TFDS's Karpathy test split), or ``shards:GLOB``, TFRecord shards whose
  records hold all captions of an image (``make_shards --group_captions`` from a CSV of a
  split's image / caption rows, e.g. Flickr30k's Karpathy test split).

Image features of a split are embedded once and cached (:class:`results.FeatureCache`), so
several tasks share them; each (model, dataset, task) result is one JSON file
(:func:`results.write_result`) and :func:`results.combined_table` joins them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Optional

from absl import logging
import ml_collections
import numpy as np

from contrastive_jax.data import pipeline
from contrastive_jax.data.tokenizers import Tokenizer
from contrastive_jax.evaluate import (embedding, fewshot, gcd, gda, knn, linear_probe, metrics,
                                      opta, prompts, results, retrieval, tfup, zeroshot)

TASKS = ("zeroshot", "linear_probe", "knn", "fewshot", "gda", "tfup", "opta", "gcd",
         "retrieval")
CLASSIFICATION_TASKS = TASKS[:-1]
# dataset -> (train split, test split); default ("train", "test").
SPLITS = {"imagenet2012": ("train", "validation"), "sun397": ("train", "test")}
RETRIEVAL_SPLITS = {"coco_captions": "test"}  # TFDS coco_captions: Karpathy splits


@dataclasses.dataclass
class Model:
  """What the tasks need of a model: its jitted encoders and how it sees images."""

  model_id: str
  encoders: embedding.Encoders
  variables: Any
  tokenizer: Tokenizer
  image_size: int
  normalization: str


@dataclasses.dataclass
class Options:
  batch_size: int = 256
  data_dir: Optional[str] = None
  num_train: Optional[int] = None  # first N examples of the train split (None: all)
  num_test: Optional[int] = None
  shots: int = 16
  knn_k: int = 20
  knn_temperature: float = 0.07
  val_fraction: float = 0.2
  seed: int = 0


def is_caption_dataset(dataset: str) -> bool:
  return dataset in RETRIEVAL_SPLITS or dataset.startswith("shards:")


def data_config(model: Model, dataset: str, options: Options) -> ml_collections.ConfigDict:
  common = dict(seed=options.seed, image_size=model.image_size,
                normalization=model.normalization, non_rgb="convert")
  if dataset.startswith("shards:"):
    return ml_collections.ConfigDict(dict(source="shards", shards=dataset[len("shards:"):],
                                          **common))
  return ml_collections.ConfigDict(dict(source="tfds", name=dataset, data_dir=options.data_dir,
                                        **common))


def _with_progress(batches, what: str, every_s: float = 30.0):
  start = last = time.perf_counter()
  n = 0
  for batch in batches:
    n += len(batch["image"])
    yield batch
    now = time.perf_counter()
    if now - last >= every_s:
      last = now
      logging.info("%s: %d images embedded (%.1f images/s).", what, n, n / (now - start))


def image_features(model: Model, dataset: str, split: str, num_examples: Optional[int], mesh,
                   options: Options, cache: Optional[results.FeatureCache] = None):
  """``(features [N, E] float32, labels [N] int32)`` of a split, from the cache when there."""

  def compute():
    ds = pipeline.stream_eval_dataset(data_config(model, dataset, options), None, split=split,
                                      num_examples=num_examples)
    labels = []

    def batches():
      for batch in ds.batch(options.batch_size).as_numpy_iterator():
        labels.append(batch["label"])
        yield batch

    feats = embedding.embed_batches(
        model.encoders.image, model.variables,
        _with_progress(batches(), f"{dataset}/{split}"), ("image",), mesh, options.batch_size)
    return np.asarray(feats, np.float32), np.concatenate(labels).astype(np.int32)

  if cache is None:
    return compute()
  return cache.get_or_compute(model.model_id, dataset, split, num_examples, compute)


def text_classifier(model: Model, dataset: str, mesh, options: Options) -> np.ndarray:
  names, templates = prompts.load(dataset)
  return zeroshot.classifier(model.encoders, model.variables, model.tokenizer, names, templates,
                             mesh, options.batch_size)


def _split_support(labels: np.ndarray, shots: int, seed: int):
  """Two disjoint ``shots``-per-class samples of the training rows (support, validation)."""
  support = fewshot.sample(labels, shots, seed)
  rest = np.setdiff1d(np.arange(len(labels)), support)
  val = rest[fewshot.sample(labels[rest], shots, seed + 1)]
  return support, val


def run_task(task: str, model: Model, dataset: str, mesh, options: Options,
             cache: Optional[results.FeatureCache] = None) -> Dict[str, float]:
  """One task's metrics on one dataset (see the module docstring)."""
  if task not in TASKS:
    raise ValueError(f"Unknown evaluation task {task!r}; known: {list(TASKS)}.")
  if task == "retrieval":
    config = data_config(model, dataset, options)
    ds = pipeline.stream_eval_dataset(config, model.tokenizer,
                                      split=RETRIEVAL_SPLITS.get(dataset, "test"),
                                      shards=config.get("shards"),
                                      num_examples=options.num_test, num_captions=5)
    return retrieval.evaluate(model.encoders, model.variables, ds, mesh, options.batch_size)
  train_split, test_split = SPLITS.get(dataset, ("train", "test"))
  test = image_features(model, dataset, test_split, options.num_test, mesh, options, cache)
  if task == "zeroshot":
    weights = text_classifier(model, dataset, mesh, options)
    logits = embedding.normalize(test[0]) @ weights.T
    return metrics.classification_metrics(logits, test[1], num_classes=len(weights))
  if task in ("tfup", "opta", "gcd"):  # training-free, on the test split (tfup/opta/gcd.py)
    if task == "tfup":
      return tfup.evaluate(*test, text_classifier(model, dataset, mesh, options))
    if task == "opta":  # N-way --shots episodes, 15 queries per class
      return opta.evaluate(*test, shots=options.shots, seed=options.seed)
    return gcd.evaluate(*test, seed=options.seed)
  train = image_features(model, dataset, train_split, options.num_train, mesh, options, cache)
  if task == "linear_probe":
    return linear_probe.evaluate(*train, *test, val_fraction=options.val_fraction,
                                 seed=options.seed)
  if task == "knn":
    return knn.evaluate(*train, *test, k=options.knn_k, temperature=options.knn_temperature)
  if task == "fewshot":
    return fewshot.evaluate(*train, *test, shots=options.shots, seed=options.seed)
  support, val = _split_support(train[1], options.shots, options.seed)
  weights = text_classifier(model, dataset, mesh, options)
  return gda.evaluate(train[0][support], train[1][support], train[0][val], train[1][val],
                      *test, weights)


def run(model: Model, tasks, datasets, mesh, options: Options, out_dir: str) -> str:
  """Runs every applicable (task, dataset) pair, writes one JSON each and ``results.md``
  (the combined table, also returned). Classification tasks skip caption datasets and
  ``retrieval`` skips classification datasets."""
  cache = results.FeatureCache(f"{out_dir}/features")
  for dataset in datasets:
    for task in tasks:
      if (task == "retrieval") != is_caption_dataset(dataset):
        logging.info("Skipping %s on %s (not applicable).", task, dataset)
        continue
      start = time.perf_counter()
      out = run_task(task, model, dataset, mesh, options, cache)
      results.write_result(out_dir, model.model_id, dataset, task, out,
                           metadata={"seconds": time.perf_counter() - start,
                                     "options": dataclasses.asdict(options)})
      logging.info("%s %s %s: %s", model.model_id, dataset, task, out)
  table = results.combined_table(out_dir)
  with open(f"{out_dir}/results.md", "w") as f:
    f.write(table + "\n")
  return table

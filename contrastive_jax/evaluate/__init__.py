"""Evaluators: zero-shot classification, retrieval, weighted kNN and linear probe.

``run_evaluators`` runs every evaluator named in ``config.eval.evaluators`` and returns
metrics keyed ``<kind>/<dataset>/<metric>`` (e.g. ``zeroshot/shapes/acc1``,
``knn/fashion_mnist/acc1``).

Image-text evaluators (``zeroshot``, ``retrieval``) need a model with ``encode_text``; the
image-only ones (``knn``, ``linear_probe``) embed the images of a labelled training split
(``train_split``, at most ``num_train`` examples) and a test split (``test_split``,
``num_test``) with ``encode_image`` and classify the test features: ``knn`` with ``k`` and
``temperature``, ``linear_probe`` with ``l2`` and ``steps`` (L-BFGS). Their ``dataset`` is the
training data's source (``config.data.source``), read with ``config.data``'s settings.
``geometry`` reports uniformity, alignment and tolerance of the eval embeddings
(:mod:`contrastive_jax.evaluate.geometry`). On shapes, ``segmentation`` scores dense zero-shot
segmentation (mIoU of patch-text score maps, ReCo and nearest-prototype variants;
:mod:`dense`), and ``tfup`` / ``opta`` / ``gcd`` the training-free adaptations of a checkpoint
(:mod:`tfup`, :mod:`opta`, :mod:`gcd`).

On the stream sources (``shards``, ``tfds``), ``retrieval`` reads the evaluator's ``shards``
glob or TFDS ``split`` (first ``num_examples`` records); with ``num_captions`` every caption
of an image (e.g. COCO's five) is a query and a positive.
"""

from __future__ import annotations

from typing import Dict

from contrastive_jax.data import pipeline, shapes
from contrastive_jax.evaluate import (dense, embedding, gcd, geometry, knn, linear_probe, opta,
                                      retrieval, tfup, zeroshot)

KINDS = ("zeroshot", "retrieval", "knn", "linear_probe", "geometry", "segmentation",
         "tfup", "opta", "gcd")
IMAGE_TEXT_DATASETS = ("shapes",)
jitted_encoders = embedding.jitted_encoders
image_features = embedding.labelled_image_features
# dataset name -> (class names, prompt templates) for zero-shot classification.
CLASSIFICATION_PROMPTS = {"shapes": (shapes.CLASS_NAMES, shapes.PROMPT_TEMPLATES)}


def _image_only(name, ev, config, encoders, variables, mesh, cache) -> Dict[str, float]:
  if ev.dataset != config.data.source:
    raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; {ev.kind} reads "
                     f"the training source config.data.source={config.data.source!r}.")

  def features(split, num_examples):  # kNN and linear probe share the embedded splits
    if (split, num_examples) not in cache:
      cache[split, num_examples] = image_features(
          encoders, variables, config.data, mesh, config.eval.batch_size, split=split,
          num_examples=num_examples)
    return cache[split, num_examples]

  train = features(ev.get("train_split", "train"), ev.get("num_train"))
  test = features(ev.get("test_split", "test"), ev.get("num_test"))
  if ev.kind == "knn":
    return knn.evaluate(*train, *test, k=ev.get("k", 200), temperature=ev.get("temperature", 0.1))
  return linear_probe.evaluate(*train, *test, l2=ev.get("l2", 1e-4), steps=ev.get("steps", 200))


def _stream_retrieval_data(name, ev, config, tokenizer):
  """Retrieval examples of a stream source: TFDS ``split`` or ``shards`` (a glob), read
  with ``config.data``'s settings; ``num_captions`` > 0 scores every caption of an image."""
  if ev.dataset != config.data.source:
    raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; retrieval on a "
                     f"stream source reads config.data (source={config.data.source!r}).")
  return pipeline.stream_eval_dataset(config.data, tokenizer, split=ev.get("split"),
                                      shards=ev.get("shards"), num_examples=ev.get("num_examples"),
                                      num_captions=ev.get("num_captions", 0))


def run_evaluators(config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """Runs ``config.eval.evaluators``; ``encoders`` from :func:`embedding.jitted_encoders`,
  ``variables`` the model's flax variables (``objectives.base.eval_variables``)."""
  results, cache = {}, {}
  batch_size = config.eval.batch_size
  # 'pooled' (cosine of pooled embeddings) or 'late_interaction' (FILIP's token-wise scores).
  scoring = config.eval.get("scoring", "pooled")
  if scoring not in zeroshot.SCORINGS:
    raise ValueError(f"config.eval.scoring={scoring!r}; expected one of {zeroshot.SCORINGS}.")
  for name, ev in config.eval.evaluators.items():
    if ev.kind not in KINDS:
      raise ValueError(f"config.eval.evaluators.{name}.kind={ev.kind!r}; expected one of {KINDS}.")
    if ev.kind == "segmentation":  # dense zero-shot mIoU on shapes, see evaluate.dense
      out = dense.evaluate(name, ev, config, encoders, variables, tokenizer, mesh)
    elif ev.kind == "geometry":  # uniformity / alignment / tolerance, see evaluate.geometry
      out = geometry.evaluate(name, ev, config, encoders, variables, tokenizer, mesh)
    elif ev.kind in ("knn", "linear_probe"):
      out = _image_only(name, ev, config, encoders, variables, mesh, cache)
    elif ev.kind in ("tfup", "opta", "gcd"):  # training-free adaptation: evaluate.tfup/opta/gcd
      module = {"tfup": tfup, "opta": opta, "gcd": gcd}[ev.kind]
      out = module.run_evaluator(name, ev, config, encoders, variables, tokenizer, mesh)
    elif ev.kind == "retrieval" and ev.dataset in pipeline.STREAM_SOURCES:
      out = retrieval.evaluate(encoders, variables, _stream_retrieval_data(name, ev, config,
                                                                          tokenizer),
                               mesh, batch_size, scoring=scoring)
    elif ev.dataset not in IMAGE_TEXT_DATASETS:
      raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; known: "
                       f"{list(IMAGE_TEXT_DATASETS)}.")
    elif ev.kind == "zeroshot":
      ds = pipeline.eval_dataset(config.data, tokenizer, split=ev.split, single_object=True,
                                 num_examples=ev.get("num_examples"))
      names, templates = CLASSIFICATION_PROMPTS[ev.dataset]
      out = zeroshot.evaluate(encoders, variables, tokenizer, ds, names, templates, mesh,
                              batch_size, scoring=scoring)
    else:
      ds = pipeline.eval_dataset(config.data, tokenizer, split=ev.split,
                                 num_examples=ev.get("num_examples"),
                                 text_key=config.data.get("text_key", "caption"))
      out = retrieval.evaluate(encoders, variables, ds, mesh, batch_size, scoring=scoring)
    results.update({f"{ev.kind}/{ev.dataset}/{k}": v for k, v in out.items()})
  return results

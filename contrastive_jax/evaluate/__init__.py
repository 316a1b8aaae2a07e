"""Evaluators: zero-shot classification and retrieval (more in later issues).

``run_evaluators`` runs every evaluator named in ``config.eval.evaluators`` and returns
metrics keyed ``<kind>/<dataset>/<metric>`` (e.g. ``zeroshot/shapes/acc1``).
"""

from __future__ import annotations

from typing import Dict

from contrastive_jax.data import pipeline, shapes
from contrastive_jax.evaluate import embedding, retrieval, zeroshot

KINDS = ("zeroshot", "retrieval")
jitted_encoders = embedding.jitted_encoders
# dataset name -> (class names, prompt templates) for zero-shot classification.
CLASSIFICATION_PROMPTS = {"shapes": (shapes.CLASS_NAMES, shapes.PROMPT_TEMPLATES)}


def run_evaluators(config, encoders, params, tokenizer, mesh) -> Dict[str, float]:
  """Runs ``config.eval.evaluators``; ``encoders`` from :func:`embedding.jitted_encoders`."""
  results = {}
  batch_size = config.eval.batch_size
  # 'pooled' (cosine of pooled embeddings) or 'late_interaction' (FILIP's token-wise scores).
  scoring = config.eval.get("scoring", "pooled")
  if scoring not in zeroshot.SCORINGS:
    raise ValueError(f"config.eval.scoring={scoring!r}; expected one of {zeroshot.SCORINGS}.")
  for name, ev in config.eval.evaluators.items():
    if ev.kind not in KINDS:
      raise ValueError(f"config.eval.evaluators.{name}.kind={ev.kind!r}; expected one of {KINDS}.")
    if ev.dataset != "shapes":
      raise ValueError(f"config.eval.evaluators.{name}.dataset={ev.dataset!r}; known: ['shapes'].")
    if ev.kind == "zeroshot":
      ds = pipeline.eval_dataset(config.data, tokenizer, split=ev.split, single_object=True,
                                 num_examples=ev.get("num_examples"))
      names, templates = CLASSIFICATION_PROMPTS[ev.dataset]
      out = zeroshot.evaluate(encoders, params, tokenizer, ds, names, templates, mesh, batch_size,
                              scoring=scoring)
    else:
      ds = pipeline.eval_dataset(config.data, tokenizer, split=ev.split,
                                 num_examples=ev.get("num_examples"),
                                 text_key=config.data.get("text_key", "caption"))
      out = retrieval.evaluate(encoders, params, ds, mesh, batch_size, scoring=scoring)
    results.update({f"{ev.kind}/{ev.dataset}/{k}": v for k, v in out.items()})
  return results

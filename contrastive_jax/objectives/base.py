"""What every objective provides, and helpers shared by the image-text objectives.

An objective is a small object with

* ``batch_keys``: the batch keys its loss reads (validated on the first batch);
* ``model``: the flax module whose ``params`` are trained (``encode_image`` /
  ``encode_text`` methods make it usable by the zero-shot evaluators);
* ``init(rng, batch) -> (params, objective_state)``; ``objective_state`` is an explicit
  pytree (queues, prototypes, EMA weights, per-sample statistics; ``{}`` when none);
* ``loss(params, objective_state, batch, rng, *, axis_name) -> (loss, (metrics, new_state))``
  on the local shard, with the global-batch loss on every device (the loss contract);
* optionally ``eval_variables(params, objective_state) -> variables``: the flax variables the
  evaluators apply ``model.encode_image`` / ``encode_text`` with (models with BatchNorm add
  their running ``batch_stats``); ``{"params": params}`` when absent.

Objectives built on :class:`Split` (CLIP, ConVIRT, SigLIP, FILIP) also expose their loss as two
halves, ``embed`` (the model, row by row) and ``contrast`` (the loss on the embeddings, with
collectives), which is what lets the trainer run the model under the compiler's partitioning
(FSDP) and accumulate gradients over micro-batches without losing global negatives
(:mod:`contrastive_jax.accumulation`).

Adding a method means adding one module here and one entry in ``OBJECTIVES``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import geometry
from contrastive_jax.models import TwoTower

def eval_variables(objective, params, objective_state):
  """The variables the evaluators use: ``objective.eval_variables`` or
  ``{"params": params}``."""
  fn = getattr(objective, "eval_variables", None)
  return fn(params, objective_state) if fn is not None else {"params": params}


class Split:
  """Base of objectives whose loss is ``contrast(embed(...))``.

  * ``embed(params, state, batch) -> outputs``: the model on the rows of ``batch``; a dict of
    per-row arrays (leading axis = the rows of ``batch``) and scalars (``ndim == 0``, the same
    for every row, e.g. the logit scale). Rows must not interact (no batch statistics, no
    randomness), so embedding a batch in shards or micro-batches gives the same rows.
  * ``contrast(outputs, state, rng, *, axis_name) -> (loss, (metrics, new_state))``: the loss
    contract on the local rows of ``outputs``, global over ``axis_name``.
  """

  def loss(self, params, state, batch, rng, *, axis_name=None):
    return self.contrast(self.embed(params, state, batch), state, rng, axis_name=axis_name)


def is_split(objective) -> bool:
  return isinstance(objective, Split)


def geometry_enabled(config) -> bool:
  """``config.metrics.geometry`` (default False): log ``uniformity`` / ``alignment``."""
  metrics = config.get("metrics")
  return bool(metrics is not None and metrics.get("geometry", False))


def add_geometry_metrics(metrics: dict, x, y, *, axis_name=None) -> dict:
  """Adds the training metrics ``uniformity`` (of ``x [b, D]``) and ``alignment`` (of ``x``
  with its positives ``y [b, D]``), global over ``axis_name`` and without gradient
  (:func:`contrastive_jax.losses.geometry.geometry_metrics`); the one place every objective
  gets them from when ``config.metrics.geometry`` is set."""
  metrics.update(geometry.geometry_metrics(x, y, axis_name=axis_name))
  return metrics


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_config(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype={name!r}; expected one of {sorted(DTYPES)}.")
  return DTYPES[name]


def two_tower_from_config(model_config, *, vocab_size: int, context_length: int,
                          **overrides) -> TwoTower:
  """Builds :class:`TwoTower` from ``config.model`` (``image``, ``text``, ``embed_dim``,
  ``dtype``, ``remat``)."""
  text = dict(model_config.text)
  text.update(vocab_size=vocab_size, context_length=context_length)
  kwargs = dict(image=dict(model_config.image), text=text, embed_dim=model_config.embed_dim,
                dtype=dtype_from_config(model_config.get("dtype", "float32")),
                remat=model_config.get("remat", False))
  kwargs.update(overrides)
  return TwoTower(**kwargs)


def clip_two_tower(config, tokenizer) -> TwoTower:
  """The two-tower of ``config.model`` with CLIP's logit-scale init unless the config sets one
  (shared by the CLIP-based objectives)."""
  return two_tower_from_config(
      config.model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
      logit_scale_init=config.model.get("logit_scale_init", TwoTower.logit_scale_init))


# ``config.loss.ring`` of the embedding-level image-text objectives (CLIP, ConVIRT, SigLIP):
# "auto" trains with the ring form once the global view's per-device logits ``[b, B]`` reach
# RING_AUTO_MIN_LOGITS floats (or when ``loss.block_size`` is set), and with the global view
# below: its one all-gather costs less than the ring's W steps of collectives and its logits
# are small (benchmarks/step_overhead.py: +2 % vs +15-20 % at B = 128 on 8 devices). Both
# forms give the same values and gradients. "always" / "never" force one.
RING_SETTINGS = ("auto", "always", "never")
RING_AUTO_MIN_LOGITS = 2**22  # 16 MiB of float32 logits per device


def ring_setting(config) -> str:
  setting = config.loss.get("ring", "auto") if "loss" in config else "auto"
  if setting not in RING_SETTINGS:
    raise ValueError(f"config.loss.ring={setting!r}; expected one of {RING_SETTINGS}.")
  return setting


def use_ring(setting: str, block_size, local_rows: int, axis_name) -> bool:
  """Whether the loss on ``local_rows`` rows per device over ``axis_name`` uses its ring form
  (static: decided at trace time from the shapes)."""
  if setting != "auto":
    return setting == "always"
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  return block_size is not None or local_rows * local_rows * devices >= RING_AUTO_MIN_LOGITS


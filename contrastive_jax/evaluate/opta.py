"""OpTA: optimal-transport alignment of few-shot prototypes (BECLR inference), and an
N-way K-shot episode evaluator comparing plain prototypes with OpTA.

BECLR (Poulakakis-Daktylidis & Jamali-Rad, ICLR 2024), METHODS.md §1.14. In a transductive
N-way K-shot episode, features are standardised per sample across feature dimensions
(``(x − mean(x)) / std(x)``), the support set gives prototypes ``μ [N, D]`` (class means)
and the queries ``Q [n_q, D]``. One OpTA pass:

    C_kq = ‖μ_k − Q_q‖² / max(C)                       (normalised squared-Euclidean cost)
    π    = Sinkhorn(C; row marginals 1/N, column marginals 1/n_q, ε)
    μ'_k = Σ_q (π_kq / Σ_q' π_kq') Q_q                 (prototypes moved into the queries)

repeated ``passes`` times (5 for 1-shot, 1 for more shots); with more than one shot each
pass mixes ``μ ← 0.7 μ' + 0.3 μ_support`` (``mix``). The plan is computed by the library's
log-domain Sinkhorn (:func:`contrastive_jax.losses.swav.sinkhorn`) on scores ``−C``, i.e.
``π ∝ exp(−C/ε)``, not BECLR's ``exp(+d/ε)`` on a distance matrix (METHODS §3.3).

Deviations: the Sinkhorn runs a fixed number of iterations (default 100) instead of up to
1000 with tolerance 1e-4 (on the shapes episodes of the tests, 100 and 1000 iterations give
the same accuracies to 1e-4, and 1000 is ~10× slower); queries are classified by the nearest
(squared Euclidean) prototype for both the plain and the OpTA prototypes, instead of a
logistic regression fitted on the N prototypes (one point per class), so the comparison
isolates the transport. Episodes draw ``ways`` classes, ``shots`` support and ``q`` queries
per class (balanced, as the uniform marginals assume; ``q`` is lowered below ``queries`` when
fewer than ``ways`` classes have ``shots + queries`` examples, see :func:`sample_episodes`).

Evaluator (``config.eval.evaluators.<name>``, :func:`run_evaluator`): ``kind="opta"``,
``dataset`` (the training source; image-only models too), ``split`` (default ``"test"``),
``num_examples`` (default 4096), ``ways`` (5), ``shots`` (a list, default ``[1, 5]``),
``queries`` (15), ``episodes`` (600); metrics ``{K}shot_acc1`` (OpTA),
``{K}shot_prototype_acc1`` and their ``_ci95``.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.losses import swav

EPSILON = 0.05
ITERATIONS = 100
MIX = 0.7


def standardize(x):
  """Per-sample standardisation across the last axis: ``(x − mean) / std`` (float32)."""
  x = jnp.asarray(x, jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.maximum(x.std(axis=-1, keepdims=True), 1e-6)


def _sq_dists(a, b):
  return jnp.maximum(jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
                     - 2.0 * a @ b.T, 0.0)


@functools.partial(jax.jit, static_argnames=("eps", "iterations"))
def transport_plan(protos, queries, eps: float = EPSILON, iterations: int = ITERATIONS):
  """Entropic OT plan ``π [N, n_q]`` between prototypes and queries (uniform marginals).

  Args:
    protos: float ``[N, D]`` prototypes.
    queries: float ``[n_q, D]`` query features.
    eps: entropic regularisation ``ε`` of the normalised cost (BECLR: 0.05), static.
    iterations: Sinkhorn iterations, static.

  Returns:
    float32 ``[N, n_q]``, ``π ∝ exp(−C/ε)`` scaled to the marginals: every column sums to
    ``1/n_q`` (exactly, to rounding) and every row to ``1/N`` (as iterations grow).
  """
  protos = jnp.asarray(protos, jnp.float32)
  queries = jnp.asarray(queries, jnp.float32)
  cost = _sq_dists(protos, queries)
  cost = cost / jnp.maximum(cost.max(), 1e-12)
  codes = swav.sinkhorn(-cost.T, eps, iterations)  # [n_q, N], rows sum to 1
  return codes.T / queries.shape[0]


@functools.partial(jax.jit, static_argnames=("eps", "passes", "iterations", "mix"))
def opta(protos, queries, eps: float = EPSILON, passes: int = 1, *,
         iterations: int = ITERATIONS, mix: Optional[float] = None):
  """Transports ``protos`` ``[N, D]`` into the distribution of ``queries`` ``[n_q, D]``.

  Args:
    protos, queries: float features (standardise them first, as BECLR does).
    eps: Sinkhorn ``ε``, static.
    passes: OpTA passes (BECLR: 5 for 1-shot, 1 otherwise), static.
    iterations: Sinkhorn iterations per pass, static.
    mix: ``None`` (use ``μ'``) or the weight ``λ`` of ``μ ← λ μ' + (1 − λ) μ_input``
      (BECLR: 0.7 with more than one shot), static.

  Returns:
    float32 ``[N, D]`` aligned prototypes.
  """
  original = jnp.asarray(protos, jnp.float32)
  queries = jnp.asarray(queries, jnp.float32)
  out = original
  for _ in range(passes):
    plan = transport_plan(out, queries, eps, iterations)
    moved = (plan / jnp.sum(plan, axis=1, keepdims=True)) @ queries
    out = moved if mix is None else mix * moved + (1.0 - mix) * original
  return out


@functools.partial(jax.jit, static_argnames=("eps", "passes", "iterations", "mix"))
def _episode_predictions(support, queries, *, eps, passes, iterations, mix):
  """``(plain_pred, opta_pred)`` ``[E, N·q]`` of ``E`` episodes: support ``[E, N, K, D]``,
  queries ``[E, N·q, D]`` (raw features; standardised here)."""

  def one(sup, qry):
    sup, qry = standardize(sup), standardize(qry)
    protos = sup.mean(axis=1)
    aligned = opta(protos, qry, eps, passes, iterations=iterations, mix=mix)
    return (jnp.argmin(_sq_dists(qry, protos), axis=1),
            jnp.argmin(_sq_dists(qry, aligned), axis=1))

  return jax.vmap(one)(support, queries)


def sample_episodes(labels, *, ways: int, shots: int, queries: int, episodes: int,
                    seed: int = 0) -> Tuple[np.ndarray, np.ndarray, int]:
  """``(support_idx [E, N, K], query_idx [E, N·q], q)``: balanced episodes of ``labels``;
  query ``n`` of an episode belongs to its class ``n // q`` (classes in episode order).

  ``N = min(ways, classes with ≥ shots + 1 examples)``; ``q = min(queries, c_N − shots)``
  with ``c_N`` the N-th largest class count; classes are drawn among those with at least
  ``shots + q`` examples, so every episode has the same shape.
  """
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  n = min(ways, int(np.sum(counts >= shots + 1)))
  if n < 2:
    raise ValueError(f"Episodes need 2 classes with >= {shots + 1} examples; "
                     f"counts {dict(zip(classes.tolist(), counts.tolist()))}.")
  q = int(min(queries, np.sort(counts)[::-1][n - 1] - shots))
  eligible = classes[counts >= shots + q]
  rng = np.random.default_rng(seed)
  members = {c: np.flatnonzero(labels == c) for c in eligible}
  support = np.zeros((episodes, n, shots), np.int64)
  query = np.zeros((episodes, n * q), np.int64)
  for e in range(episodes):
    for j, c in enumerate(rng.choice(eligible, n, replace=False)):
      pick = rng.choice(members[c], shots + q, replace=False)
      support[e, j] = pick[:shots]
      query[e, j * q:(j + 1) * q] = pick[shots:]
  return support, query, q


def evaluate(features, labels, *, ways: int = 5, shots: int = 1, queries: int = 15,
             episodes: int = 200, eps: float = EPSILON, passes: Optional[int] = None,
             iterations: int = ITERATIONS, seed: int = 0) -> Dict[str, float]:
  """Few-shot episode accuracy with plain prototypes and with OpTA.

  Args:
    features, labels: float ``[M, D]`` / int ``[M]`` labelled pool (e.g. a test split).
    ways, shots, queries, episodes: N-way K-shot episodes with ``queries`` per class.
    eps, iterations: Sinkhorn settings.
    passes: OpTA passes (default: 5 for 1-shot, 1 otherwise).
    seed: episode sampling seed.

  Returns:
    ``acc1`` (OpTA, mean over episodes), ``prototype_acc1`` (plain prototypes), their
    95 % confidence half-widths ``acc1_ci95`` / ``prototype_acc1_ci95``, and ``ways``,
    ``shots``, ``queries`` (per class), ``episodes``.
  """
  passes = (5 if shots == 1 else 1) if passes is None else passes
  support, query, q = sample_episodes(labels, ways=ways, shots=shots, queries=queries,
                                      episodes=episodes, seed=seed)
  features = np.asarray(features, np.float32)
  plain, aligned = _episode_predictions(features[support], features[query], eps=eps,
                                        passes=passes, iterations=iterations,
                                        mix=None if shots == 1 else MIX)
  truth = np.repeat(np.arange(support.shape[1]), q)[None, :]
  out = {}
  for key, pred in (("acc1", aligned), ("prototype_acc1", plain)):
    acc = np.mean(np.asarray(pred) == truth, axis=1)
    out[key] = float(acc.mean())
    out[f"{key}_ci95"] = float(1.96 * acc.std() / np.sqrt(len(acc)))
  out.update(ways=int(support.shape[1]), shots=int(shots), queries=int(q),
             episodes=int(episodes))
  return out


def run_evaluator(name, ev, config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """The ``opta`` evaluator (see the module docstring)."""
  del tokenizer
  from contrastive_jax.evaluate import tfup  # pylint: disable=import-outside-toplevel
  features, labels = tfup.evaluator_features(name, ev, config, encoders, variables, mesh)
  out = {}
  for shots in ev.get("shots", (1, 5)):
    res = evaluate(features, labels, ways=ev.get("ways", 5), shots=int(shots),
                   queries=ev.get("queries", 15), episodes=ev.get("episodes", 600),
                   seed=ev.get("seed", 0))
    out.update({f"{shots}shot_{k}": v for k, v in res.items() if k != "shots"})
  return out

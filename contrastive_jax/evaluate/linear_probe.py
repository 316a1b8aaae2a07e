"""Linear probe: multinomial logistic regression on frozen features.

A ``[D, C]`` softmax classifier with L2 penalty ``l2 · ||W||²/2`` (on the weights, not the
bias; the data term is the mean cross-entropy) is fitted full-batch by L-BFGS (optax) from a
zero initialisation, so a fit is deterministic. Features may first be L2-normalised
(``normalize``, what CLIP_benchmark's ``Featurizer`` does by default) and/or standardised with
the training set's mean and standard deviation (``standardize``, the default here).

Choosing ``l2`` on validation data (CLIP_benchmark's protocol, after CLIP paper A.3): with
``val_fraction`` a random part of the training set (seeded permutation) is held out, or
``val_features``/``val_labels`` are given; the penalty is searched on the grid
``np.logspace(-6, 2, 97)`` (their ``wd_list``): first its 7 points ``logspace(-6, 2, 7)``,
then around the best index ``i`` the points ``[i - s, i, i + s]`` for spans ``s = 8, 4, 2, 1``,
keeping the first candidate (in that order) with the highest validation ``acc1``, so ties go
to the smaller penalty. The chosen value is refitted on train + validation and tested.

Differences from CLIP_benchmark, by design: the probe is fitted by L-BFGS on an L2-penalised
objective rather than AdamW (``lr=0.1``, 10 epochs, cosine schedule) with decoupled weight
decay, so a grid value means "penalty" here and "weight decay" there; when every candidate
of a round scores 0 the round keeps its first candidate (CLIP_benchmark falls back to grid
index 0); and ``acc5`` is reported when ``num_classes >= 5`` (CLIP_benchmark's probe tests
``max(test label) >= 5``).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax.evaluate import metrics

L2_GRID = np.logspace(-6, 2, num=97)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _lbfgs_fit(x, y, l2, *, num_classes: int, steps: int):
  """``(w [D, C], b [C], final objective)``; ``l2`` is traced, so a grid search compiles once."""
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def body(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), None, length=steps)
  return params["w"], params["b"], loss_fn(params)


def _normalized(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit(features, labels, *, num_classes: int, l2: float = 1e-4, steps: int = 200,
        standardize: bool = True):
  """Fits the probe; returns ``(weights [D, C], bias [C], mean [D], std [D], final_loss)``.

  Args:
    features: float ``[N, D]`` training features.
    labels: int ``[N]`` labels in ``[0, num_classes)``.
    l2: penalty on the weights (not the bias), per example.
    steps: L-BFGS iterations.
    standardize: scale features by the training mean/std (else ``mean = 0``, ``std = 1``).
  """
  x = jnp.asarray(features, jnp.float32)
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}).")
  if standardize:
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  else:
    mean, std = jnp.zeros(x.shape[1]), jnp.ones(x.shape[1])
  w, b, final = _lbfgs_fit((x - mean) / std, jnp.asarray(labels, jnp.int32),
                           jnp.float32(l2), num_classes=num_classes, steps=steps)
  return w, b, mean, std, float(final)


def predict(features, w, b, mean, std) -> np.ndarray:
  """Logits ``[N, C]`` of a fitted probe (``fit``'s outputs) on float ``[N, D]`` features."""
  return np.asarray(((jnp.asarray(features, jnp.float32) - mean) / std) @ w + b)


def search_grid(score: Callable[[int], float], grid_size: int = len(L2_GRID),
                num_init: int = 7) -> Tuple[int, Dict[int, float]]:
  """CLIP_benchmark's coarse-to-fine search for the grid index with the highest score.

  Scores ``num_init`` evenly spaced indices (``0, 16, ..., 96`` for 97 points), then, for
  spans ``s`` halving from ``(grid_size - 1) // (num_init - 1) // 2`` down to 1, the indices
  ``[i - s, i, i + s]`` (clipped) around the current best ``i``. Within a round the first
  index with the highest score wins (ties favour the lower index).

  Args:
    score: ``index -> score`` (e.g. validation accuracy of the probe fitted with
      ``L2_GRID[index]``); called at most once per index.
    grid_size: number of grid points.
    num_init: number of coarse points (at least 2).

  Returns:
    ``(best_index, {index: score})`` over every index scored.
  """
  if num_init < 2 or grid_size < num_init:
    raise ValueError(f"need 2 <= num_init <= grid_size; got {num_init}, {grid_size}.")
  scores: Dict[int, float] = {}

  def peak(indices: Sequence[int]) -> int:
    best = None
    for i in indices:
      if i not in scores:
        scores[i] = float(score(i))
      if best is None or scores[i] > scores[best]:
        best = i
    return best

  coarse = np.linspace(0, grid_size - 1, num_init).round().astype(int).tolist()
  best = peak(coarse)
  span = (grid_size - 1) // (num_init - 1) // 2
  while span > 0:
    best = peak([max(best - span, 0), best, min(best + span, grid_size - 1)])
    span //= 2
  return best, scores


def _split(n: int, val_fraction: float, seed: int):
  n_val = int(n * val_fraction)
  if not 0 < n_val < n:
    raise ValueError(f"val_fraction={val_fraction} of {n} training examples leaves an empty "
                     "train or validation part.")
  perm = np.random.default_rng(seed).permutation(n)
  return perm[n_val:], perm[:n_val]


def evaluate(train_features, train_labels, test_features, test_labels, *, l2: float = 1e-4,
             steps: int = 200, val_fraction: float = 0.0, val_features=None, val_labels=None,
             l2_grid: Sequence[float] = L2_GRID, num_init: int = 7, seed: int = 0,
             normalize: bool = False, standardize: bool = True,
             num_classes: Optional[int] = None) -> Dict[str, float]:
  """Test metrics of the probe, with ``l2`` fixed or chosen on validation data.

  Args:
    train_features, train_labels: float ``[N, D]`` / int ``[N]`` training split.
    test_features, test_labels: float ``[M, D]`` / int ``[M]`` test split.
    l2: the penalty when no validation data is used.
    steps: L-BFGS iterations of every fit.
    val_fraction: in ``(0, 1)``: hold out ``floor(N · val_fraction)`` random training examples
      (permutation seeded by ``seed``) to choose the penalty on ``l2_grid``; 0: no search.
    val_features, val_labels: an explicit validation split instead (CLIP_benchmark's
      ``val_split``); exclusive with ``val_fraction``.
    l2_grid: the candidate penalties, searched with :func:`search_grid`.
    num_init: coarse points of the search.
    normalize: L2-normalise every feature vector first (CLIP_benchmark's default).
    standardize: standardise with the training mean/std (see :func:`fit`).
    num_classes: default ``1 + max label`` over all splits.

  Returns:
    ``acc1``, ``acc5`` (``num_classes >= 5``), ``mean_per_class_recall`` (see
    :func:`metrics.classification_metrics`), ``train_loss`` (final objective of the last
    fit), ``l2`` (the penalty used) and, after a search, ``val_acc1`` (its validation
    accuracy).
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  searched = val_fraction > 0 or val_features is not None
  if val_fraction > 0 and val_features is not None:
    raise ValueError("Pass either val_fraction or val_features, not both.")
  prep = _normalized if normalize else (lambda x: np.asarray(x, np.float32))
  train_x, test_x = prep(train_features), prep(test_features)
  if val_features is not None:
    val_x, val_y = prep(val_features), np.asarray(val_labels)
    search_x, search_y = train_x, train_labels
    final_x = np.concatenate([train_x, val_x])
    final_y = np.concatenate([train_labels, val_y])
  else:
    final_x, final_y = train_x, train_labels
    if val_fraction > 0:
      tr, va = _split(len(train_x), val_fraction, seed)
      search_x, search_y = train_x[tr], train_labels[tr]
      val_x, val_y = train_x[va], train_labels[va]
  if num_classes is None:
    num_classes = 1 + int(max(final_y.max(), test_labels.max()))
  out = {}
  if searched:
    grid = np.asarray(l2_grid, np.float64)

    def val_acc1(i):
      params = fit(search_x, search_y, num_classes=num_classes, l2=float(grid[i]), steps=steps,
                   standardize=standardize)
      return float(np.mean(np.argmax(predict(val_x, *params[:4]), axis=1) == val_y))

    best, scores = search_grid(val_acc1, len(grid), num_init)
    l2 = float(grid[best])
    out["val_acc1"] = scores[best]
  w, b, mean, std, final = fit(final_x, final_y, num_classes=num_classes, l2=l2, steps=steps,
                               standardize=standardize)
  out.update(metrics.classification_metrics(predict(test_x, w, b, mean, std), test_labels,
                                            num_classes=num_classes))
  out["train_loss"] = final
  out["l2"] = float(l2)
  return out

"""Generalized category discovery with a semi-supervised Gaussian mixture (GPC-style).

METHODS.md §2.12 (Zhao et al., ICCV 2023; details there are [unverified], so this is the
generic "semi-supervised GMM prototypes" piece, on frozen features, without the
representation learning or split-and-merge). Setting: some classes are *old* and part of
their examples is labelled; the unlabelled set mixes the rest of the old classes' examples
with every example of the *new* classes. The model is a mixture of ``K = K_old + K_new``
isotropic Gaussians with a shared variance on L2-normalised features ``x ∈ R^D``:

    p(x) = Σ_k π_k N(x; μ_k, σ² I)

fitted by EM on the joint log-likelihood

    ℓ = Σ_labelled log(π_y N(x; μ_y, σ² I)) + Σ_unlabelled log Σ_k π_k N(x; μ_k, σ² I),

the labelled points' responsibilities clamped to their class (one-hot, never updated).
E-step: unlabelled responsibilities ``r_ik ∝ π_k N(x_i; μ_k, σ²)``. M-step (exact
maximiser): ``N_k = Σ_i r_ik``, ``μ_k = Σ_i r_ik x_i / N_k`` (kept when ``N_k = 0``),
``π_k = N_k / N``, ``σ² = max(Σ_ik r_ik ‖x_i − μ_k‖² / (N D), σ²_min)`` — so ``ℓ`` never
decreases (tested). Initialisation: old components at the labelled class means, new ones by
k-means++ over the unlabelled points (distances to every mean chosen so far), one hard
assignment step, then EM; ``restarts`` seeds, the highest final ``ℓ`` wins. Prediction:
``argmax_k r_ik`` (component ``k < K_old`` is old class ``old_classes[k]``).

Evaluation (the GCD protocol's "v2" accuracy): clustering accuracy of the unlabelled
examples under the best one-to-one matching of components to classes (Hungarian,
``scipy.optimize.linear_sum_assignment``), reported on all of them (``acc1``) and, with the
same matching, on the old-class and new-class examples (``acc_old``, ``acc_new``); the
baseline ``unsupervised_acc1`` fits the same mixture without labels (``K`` k-means++
components), on the same unlabelled examples.

Evaluator (``config.eval.evaluators.<name>``, :func:`run_evaluator`): ``kind="gcd"``,
``dataset`` (the training source; image-only models too), ``split`` (default ``"test"``),
``num_examples`` (default 4096), ``old_fraction`` / ``labelled_fraction`` (0.5 / 0.5),
``restarts`` (3), ``seed``; the class count is the dataset's (shapes: 64).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import optimize

VAR_FLOOR = 1e-6


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sq_dists(x, means):
  return np.maximum(np.sum(x * x, 1)[:, None] + np.sum(means * means, 1)[None, :]
                    - 2.0 * x @ means.T, 0.0)


def hungarian_accuracy(y_true, y_pred, mask=None) -> float:
  """Clustering accuracy: the fraction of ``y_true`` matched by ``y_pred`` under the best
  one-to-one map of predicted ids to labels (computed on all points; ``mask`` restricts
  which points are *counted* afterwards, as GCD's old/new accuracies do)."""
  return float(np.mean(_matched(y_true, y_pred)[mask if mask is not None else slice(None)]))


def _matched(y_true, y_pred) -> np.ndarray:
  """bool ``[n]``: point ``i``'s predicted id maps to its label under the Hungarian match."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  _, t = np.unique(y_true, return_inverse=True)
  p_ids, p = np.unique(y_pred, return_inverse=True)
  size = max(t.max(initial=0), p.max(initial=0)) + 1
  counts = np.zeros((size, size), np.int64)
  np.add.at(counts, (p, t), 1)
  rows, cols = optimize.linear_sum_assignment(counts, maximize=True)
  mapping = np.empty(size, np.int64)
  mapping[rows] = cols
  return mapping[p] == t


@dataclasses.dataclass
class Mixture:
  """A fitted mixture: ``means [K, D]``, ``weights [K]``, ``variance`` (σ²), unlabelled
  ``responsibilities [n_u, K]`` and the joint log-likelihood after every EM iteration."""

  means: np.ndarray
  weights: np.ndarray
  variance: float
  responsibilities: np.ndarray
  log_likelihood: np.ndarray


def _log_gauss(x, means, variance):
  d = x.shape[1]
  return -0.5 * d * np.log(2 * np.pi * variance) - _sq_dists(x, means) / (2 * variance)


def _log_weights(weights):
  return np.log(np.maximum(weights, 1e-300))


def _kmeans_pp(x, centres, count, rng):
  """``count`` more centres by k-means++ seeding over ``x`` given existing ``centres``
  (a point is drawn with probability ∝ its squared distance to the nearest centre; uniformly
  when every distance is 0)."""
  out = list(centres)
  d2 = _sq_dists(x, np.asarray(out)).min(axis=1) if out else np.full(len(x), np.inf)
  for _ in range(count):
    finite = np.where(np.isfinite(d2), d2, 1.0)
    total = finite.sum()
    out.append(x[rng.choice(len(x), p=finite / total) if total > 0 else rng.integers(len(x))])
    d2 = np.minimum(d2, np.sum((x - out[-1]) ** 2, axis=1))
  return np.asarray(out).reshape(-1, x.shape[1])


def _m_step(x_l, y_l, x_u, r_u, means, num_components, var_floor):
  n, d = len(x_l) + len(x_u), x_u.shape[1]
  sums = r_u.T @ x_u
  counts = r_u.sum(axis=0)
  if len(x_l):
    np.add.at(sums, y_l, x_l)
    counts = counts + np.bincount(y_l, minlength=num_components)
  means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1e-300)[:, None], means)
  scatter = np.sum(r_u * _sq_dists(x_u, means))
  if len(x_l):
    scatter += np.sum((x_l - means[y_l]) ** 2)
  return means, counts / n, max(scatter / (n * d), var_floor)


def _responsibilities(x_u, means, weights, variance):
  """E-step: ``[n_u, K]`` posteriors ``∝ π_k N(x; μ_k, σ² I)``."""
  joint = _log_weights(weights)[None, :] + _log_gauss(x_u, means, variance)
  joint -= joint.max(axis=1, keepdims=True)
  resp = np.exp(joint)
  return resp / resp.sum(axis=1, keepdims=True)


def _log_likelihood(x_l, y_l, x_u, means, weights, variance):
  lw = _log_weights(weights)
  d = x_u.shape[1]
  out = 0.0
  if len(x_l):
    sq = np.sum((x_l - means[y_l]) ** 2, axis=1)
    out = np.sum(lw[y_l] - 0.5 * d * np.log(2 * np.pi * variance) - sq / (2 * variance))
  joint = lw[None, :] + _log_gauss(x_u, means, variance)
  m = joint.max(axis=1, keepdims=True)
  return float(out + np.sum(m[:, 0] + np.log(np.exp(joint - m).sum(axis=1))))


def fit(x_labelled, y_labelled, x_unlabelled, *, num_old: int, num_new: int,
        iterations: int = 100, tol: float = 1e-7, restarts: int = 3, seed: int = 0,
        var_floor: float = VAR_FLOOR, normalize: bool = True) -> Mixture:
  """Semi-supervised GMM by EM (see the module docstring).

  Args:
    x_labelled: float ``[n_l, D]`` labelled features (may be empty).
    y_labelled: int ``[n_l]`` in ``[0, num_old)``; every old class needs a labelled example.
    x_unlabelled: float ``[n_u, D]``.
    num_old, num_new: ``K_old`` (clamped) and ``K_new`` (free) components.
    iterations: EM iterations at most; stops early when ``ℓ`` improves by less than
      ``tol · |ℓ|``.
    restarts: k-means++ seeds of the new components; the best final ``ℓ`` is returned.
    seed: seed of the restarts.
    var_floor: ``σ²_min``.
    normalize: L2-normalise the features first.

  Returns:
    The best :class:`Mixture`; components ``[0, num_old)`` are the old classes.
  """
  prep = _normalized if normalize else (lambda a: np.asarray(a, np.float64))
  x_u = prep(x_unlabelled)
  d = x_u.shape[1]
  x_l = prep(x_labelled).reshape(-1, d)
  y_l = np.asarray(y_labelled, np.int64).reshape(-1)
  k = num_old + num_new
  if k < 1:
    raise ValueError("The mixture needs at least one component.")
  old_counts = np.bincount(y_l, minlength=num_old)
  if len(old_counts) > num_old or (num_old and not old_counts.all()):
    raise ValueError(f"Labels must cover [0, {num_old}); counts {old_counts.tolist()}.")
  old_means = np.zeros((num_old, d))
  np.add.at(old_means, y_l, x_l)
  old_means /= np.maximum(old_counts, 1)[:, None]
  best = None
  for r in range(max(restarts, 1)):
    rng = np.random.default_rng([seed, r])
    means = _kmeans_pp(x_u, old_means, num_new, rng)
    hard = np.eye(k)[np.argmin(_sq_dists(x_u, means), axis=1)]
    means, weights, variance = _m_step(x_l, y_l, x_u, hard, means, k, var_floor)
    history = [_log_likelihood(x_l, y_l, x_u, means, weights, variance)]
    for _ in range(iterations):
      resp = _responsibilities(x_u, means, weights, variance)
      means, weights, variance = _m_step(x_l, y_l, x_u, resp, means, k, var_floor)
      history.append(_log_likelihood(x_l, y_l, x_u, means, weights, variance))
      if history[-1] - history[-2] <= tol * abs(history[-2]):
        break
    resp = _responsibilities(x_u, means, weights, variance)
    out = Mixture(means, weights, variance, resp, np.asarray(history))
    if best is None or history[-1] > best.log_likelihood[-1]:
      best = out
  return best


def split(labels, *, old_classes: Optional[Sequence[int]] = None, old_fraction: float = 0.5,
          labelled_fraction: float = 0.5, seed: int = 0):
  """GCD split of a labelled pool: ``(old_classes [K_old], labelled_idx, unlabelled_idx)``.

  ``old_classes`` default: a seeded random ``round(old_fraction · C)`` of the ``C`` classes
  present; per old class, ``round(labelled_fraction · n_c)`` (at least 1) examples are
  labelled; every other example is unlabelled.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  present = np.unique(labels)
  if old_classes is None:
    n_old = int(round(old_fraction * len(present)))
    old_classes = np.sort(rng.choice(present, n_old, replace=False))
  old_classes = np.asarray(old_classes, np.int64)
  labelled = []
  for c in old_classes:
    members = rng.permutation(np.flatnonzero(labels == c))
    labelled.append(members[:max(1, int(round(labelled_fraction * len(members))))])
  labelled = np.sort(np.concatenate(labelled)) if labelled else np.zeros(0, np.int64)
  unlabelled = np.setdiff1d(np.arange(len(labels)), labelled)
  return old_classes, labelled, unlabelled


def evaluate(features, labels, *, num_classes: Optional[int] = None,
             old_classes: Optional[Sequence[int]] = None, old_fraction: float = 0.5,
             labelled_fraction: float = 0.5, num_new: Optional[int] = None,
             iterations: int = 100, restarts: int = 3, seed: int = 0) -> Dict[str, float]:
  """GCD metrics of the semi-supervised GMM on a labelled pool (labels of the unlabelled
  part are used only for scoring).

  Args:
    features, labels: float ``[M, D]`` / int ``[M]``.
    num_classes: the dataset's class count ``C`` (default: the classes present); the new
      components default to ``C − K_old`` (the number of classes is known, as in GCD's
      main protocol).
    old_classes, old_fraction, labelled_fraction, seed: see :func:`split`.
    num_new: override ``K_new``.
    iterations, restarts: EM settings.

  Returns:
    ``acc1`` (all unlabelled), ``acc_old``, ``acc_new``, ``unsupervised_acc1`` (same
    mixture without labels), ``num_old``, ``num_new``, ``num_labelled``, ``num_unlabelled``.
  """
  labels = np.asarray(labels)
  old, lab, unl = split(labels, old_classes=old_classes, old_fraction=old_fraction,
                        labelled_fraction=labelled_fraction, seed=seed)
  c = len(np.unique(labels)) if num_classes is None else int(num_classes)
  k_new = max(c - len(old), 0) if num_new is None else int(num_new)
  index_of = {int(o): i for i, o in enumerate(old)}
  y_l = np.asarray([index_of[int(y)] for y in labels[lab]], np.int64)
  mix = fit(features[lab], y_l, features[unl], num_old=len(old), num_new=k_new,
            iterations=iterations, restarts=restarts, seed=seed)
  pred = np.argmax(mix.responsibilities, axis=1)
  truth = labels[unl]
  is_old = np.isin(truth, old)
  matched = _matched(truth, pred)
  baseline = fit(np.zeros((0, features.shape[1])), np.zeros(0, np.int64), features[unl],
                 num_old=0, num_new=len(old) + k_new, iterations=iterations,
                 restarts=restarts, seed=seed)
  nan = float("nan")
  return {
      "acc1": float(matched.mean()),
      "acc_old": float(matched[is_old].mean()) if is_old.any() else nan,
      "acc_new": float(matched[~is_old].mean()) if (~is_old).any() else nan,
      "unsupervised_acc1": hungarian_accuracy(truth, np.argmax(baseline.responsibilities, 1)),
      "num_old": int(len(old)), "num_new": int(k_new),
      "num_labelled": int(len(lab)), "num_unlabelled": int(len(unl)),
  }


def run_evaluator(name, ev, config, encoders, variables, tokenizer, mesh) -> Dict[str, float]:
  """The ``gcd`` evaluator (see the module docstring)."""
  del tokenizer
  from contrastive_jax.evaluate import tfup  # pylint: disable=import-outside-toplevel
  features, labels = tfup.evaluator_features(name, ev, config, encoders, variables, mesh)
  num_classes = 64 if ev.dataset == "shapes" else None
  return evaluate(features, labels, num_classes=num_classes,
                  old_fraction=ev.get("old_fraction", 0.5),
                  labelled_fraction=ev.get("labelled_fraction", 0.5),
                  restarts=ev.get("restarts", 3), seed=ev.get("seed", 0))

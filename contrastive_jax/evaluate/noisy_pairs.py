"""Noisy image-text pair detection with LSA (Linear Separation Alternating; METHODS.md §2.32).

LSA's observation: in a contrastive feature space, clean and noisy samples are (nearly)
linearly separable, but a linear detector trained on confident pseudo-labels misses the
"easy" clean samples that a small-loss detector keeps; alternating the two detectors keeps
both. For image-text pairs of a checkpoint this module

1. embeds every pair and computes its **small-loss** score: the symmetric InfoNCE loss of the
   pair against all other pairs of the set (:func:`pair_losses`);
2. alternates for ``rounds`` rounds: the most confident ``select_fraction`` clean and noisy
   pairs of the current detector (small-loss on even rounds, the previous linear separator on
   odd ones) train a **linear separator** (ridge regression to ±1, :func:`fit_linear_separator`)
   on the pair features ``u ⊙ v`` (normalised image ⊙ text embedding; their sum is the cosine);
3. scores each pair by the mean rank of both detectors (``noise_score`` in ``[0, 1]``, high =
   suspicious) and flags the pairs a two-component 1-D Gaussian mixture on the final
   separator's decision values assigns to its low component, provided the pair losses are
   bimodal at all (a 2-GMM on them is separated, Ashman's D ≥ 2; a clean set gets no flags).

CLI (works on any image-text checkpoint of ours)::

  python -m contrastive_jax.evaluate.noisy_pairs --config configs/clip_shapes.py \\
      --workdir /tmp/clip_shapes --num_examples 1024 --corrupt_fraction 0.2 \\
      --output /tmp/noisy_pairs.json

reads the first ``--num_examples`` training pairs (``--corrupt_fraction``: swap that fraction
of captions among themselves first and report AUROC / precision / recall against the truth),
and writes ``(index, score, flagged)`` per pair plus counts to ``--output`` (``.json`` or
``.csv``). Deviations from the paper: no noise-robust training (PLS) around the detectors, a
ridge separator instead of a trained linear layer, and no trusted subset (pseudo-labels only).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, Optional

import numpy as np


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def _logsumexp(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def pair_losses(image_emb, text_emb, scale: float, *, chunk: int = 1024) -> np.ndarray:
  """Per-pair symmetric InfoNCE loss against every pair of the set.

  Args:
    image_emb / text_emb: ``[N, E]`` embeddings of pair ``i`` (normalised here).
    scale: logit scale (``exp`` of the model's ``logit_scale``).
    chunk: rows scored at once (memory ``chunk × N``).
  Returns:
    float64 ``[N]``: ``(CE_i→t + CE_t→i) / 2`` of each pair (small = likely clean).
  """
  u, v = _normalize(image_emb), _normalize(text_emb)
  n = len(u)
  pos = scale * (u * v).sum(-1)
  i2t, t2i = np.empty(n), np.empty(n)
  for s in range(0, n, chunk):
    i2t[s:s + chunk] = _logsumexp(scale * u[s:s + chunk] @ v.T, axis=1)
    t2i[s:s + chunk] = _logsumexp(scale * v[s:s + chunk] @ u.T, axis=1)
  return (i2t + t2i) / 2 - pos


def fit_linear_separator(features, labels, *, l2: float = 1e-2):
  """Ridge regression of ``labels`` (bool, True = clean) as ±1 on ``features``.

  Minimises ``Σ_i (y_i - w·x_i - b)² + l2·N·|w|²`` (unpenalised bias) in closed form.
  Returns ``(w [D], b)``; ``x·w + b > 0`` is the clean side.
  """
  x = np.asarray(features, np.float64)
  y = np.where(np.asarray(labels, bool), 1.0, -1.0)
  mean_x, mean_y = x.mean(0), y.mean()
  xc = x - mean_x
  gram = xc.T @ xc + l2 * len(x) * np.eye(x.shape[1])
  w = np.linalg.solve(gram, xc.T @ (y - mean_y))
  return w, float(mean_y - mean_x @ w)


def rank_scores(x) -> np.ndarray:
  """Ranks of ``x`` scaled to ``[0, 1]`` (0: smallest; ties broken by position)."""
  x = np.asarray(x)
  ranks = np.empty(len(x))
  ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
  return ranks / max(len(x) - 1, 1)


def gmm_low_component(x, *, iters: int = 100):
  """A two-component 1-D Gaussian mixture fitted by EM (started from the quartiles).

  Returns ``(low [N] bool, separation)``: the rows whose posterior of the lower-mean
  component is > 0.5, and Ashman's ``D = √2·|μ₁ - μ₂| / √(σ₁² + σ₂²)`` (``D < 2``: the data
  are not clearly bimodal, which a two-component fit would still cut in two)."""
  x = np.asarray(x, np.float64)
  mu = np.percentile(x, [25, 75]).astype(np.float64)
  var = np.full(2, x.var() / 4 + 1e-12)
  pi = np.full(2, 0.5)
  for _ in range(iters):
    logp = (np.log(pi) - 0.5 * np.log(2 * np.pi * var)
            - 0.5 * (x[:, None] - mu) ** 2 / var)
    post = np.exp(logp - _logsumexp(logp, axis=1)[:, None])
    nk = post.sum(0) + 1e-12
    pi, mu = nk / len(x), (post * x[:, None]).sum(0) / nk
    var = (post * (x[:, None] - mu) ** 2).sum(0) / nk + 1e-6 * x.var() + 1e-12
  low = int(np.argmin(mu))
  separation = np.sqrt(2) * abs(mu[1] - mu[0]) / np.sqrt(var.sum())
  return post[:, low] > 0.5, float(separation)


def lsa(image_emb, text_emb, scale: float, *, rounds: int = 4, select_fraction: float = 0.25,
        l2: float = 1e-2, min_separation: float = 2.0) -> Dict[str, np.ndarray]:
  """LSA scores of ``N`` pairs (see the module docstring).

  Returns a dict of ``[N]`` arrays: ``loss`` (small-loss detector), ``linear`` (the final
  separator's decision value, high = clean), ``noise_score`` (mean rank of both detectors,
  high = suspicious), bool ``flagged`` (the low component of a 2-GMM on ``linear``, and only
  when the losses themselves are bimodal: Ashman's ``D ≥ min_separation`` of a 2-GMM on
  ``-loss``) and the scalar ``loss_separation`` (that ``D``).
  """
  u, v = _normalize(image_emb), _normalize(text_emb)
  features = u * v
  loss = pair_losses(u, v, scale)
  small_loss = rank_scores(-loss)  # high = clean
  k = max(1, int(select_fraction * len(u)))
  detector, linear = small_loss, None
  for r in range(rounds):
    if r % 2 == 0:
      detector = small_loss
    order = np.argsort(detector, kind="stable")
    chosen = np.concatenate([order[:k], order[-k:]])
    clean = np.concatenate([np.zeros(k, bool), np.ones(k, bool)])
    w, b = fit_linear_separator(features[chosen], clean, l2=l2)
    linear = features @ w + b
    detector = rank_scores(linear)
  noise_score = 1.0 - (small_loss + rank_scores(linear)) / 2
  _, separation = gmm_low_component(-loss)
  flagged = gmm_low_component(linear)[0] & (separation >= min_separation)
  return dict(loss=loss, linear=linear, noise_score=noise_score, flagged=flagged,
              loss_separation=np.float64(separation))


def auroc(scores, positive) -> float:
  """Area under the ROC curve of ``scores`` for bool ``positive`` (ties count one half)."""
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  pos, neg = scores[positive], scores[~positive]
  if not len(pos) or not len(neg):
    return float("nan")
  greater = (pos[:, None] > neg[None]).mean()
  ties = (pos[:, None] == neg[None]).mean()
  return float(greater + 0.5 * ties)


def detection_metrics(result: Dict[str, np.ndarray], is_noisy) -> Dict[str, float]:
  """AUROC of ``noise_score`` and of each detector alone, precision / recall of ``flagged``."""
  is_noisy = np.asarray(is_noisy, bool)
  flagged = result["flagged"]
  hits = float((flagged & is_noisy).sum())
  return dict(auroc=auroc(result["noise_score"], is_noisy),
              auroc_small_loss=auroc(result["loss"], is_noisy),
              auroc_linear=auroc(-result["linear"], is_noisy),
              precision=hits / max(flagged.sum(), 1), recall=hits / max(is_noisy.sum(), 1))


def swap_captions(num: int, fraction: float, seed: int = 0):
  """``(permutation [N], is_noisy [N])``: a random ``fraction`` of the rows get another chosen
  row's caption (a cyclic shift among them, so none keeps its own)."""
  rng = np.random.default_rng(seed)
  chosen = rng.choice(num, size=int(round(fraction * num)), replace=False)
  perm = np.arange(num)
  if len(chosen) > 1:
    perm[chosen] = np.roll(chosen, 1)
  return perm, perm != np.arange(num)


def write(path: str, result: Dict[str, np.ndarray], index, extra: Optional[dict] = None) -> dict:
  """Writes ``(index, score, flagged)`` rows (``.csv``) or them plus counts (``.json``) and
  returns the summary (counts and ``extra``)."""
  summary = dict(num_pairs=int(len(index)), num_flagged=int(result["flagged"].sum()),
                 loss_separation=float(result["loss_separation"]), **(extra or {}))
  rows = [dict(index=int(i), score=float(s), flagged=bool(f))
          for i, s, f in zip(index, result["noise_score"], result["flagged"])]
  rows.sort(key=lambda r: -r["score"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".csv"):
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["index", "score", "flagged"])
      writer.writeheader()
      writer.writerows(rows)
  else:
    with open(path, "w") as f:
      json.dump(dict(summary, pairs=rows), f, indent=1)
  return summary


def main():
  from absl import app, flags
  import jax
  from ml_collections import config_flags

  from contrastive_jax import train, writers
  from contrastive_jax.data import pipeline
  from contrastive_jax.evaluate import embedding
  from contrastive_jax.evaluate.__main__ import _checkpoint_dir

  config_flag = config_flags.DEFINE_config_file("config", None, "The training configuration.",
                                                lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  checkpoint = flags.DEFINE_string("checkpoint", None, "A checkpoint step directory.")
  output = flags.DEFINE_string("output", None, "Where to write the pairs (.json or .csv).")
  num_examples = flags.DEFINE_integer("num_examples", 1024, "First N training pairs.")
  corrupt = flags.DEFINE_float("corrupt_fraction", 0.0, "Swap this fraction of captions first "
                               "and report detection metrics against the truth.")
  rounds = flags.DEFINE_integer("rounds", 4, "Alternation rounds.")
  select = flags.DEFINE_float("select_fraction", 0.25, "Pseudo-labelled fraction per side.")
  batch_size = flags.DEFINE_integer("batch_size", 256, "Embedding batch (all devices).")

  def run(argv):
    del argv
    writers.quiet_library_logs()
    config = config_flag.value
    if config is None or not output.value:
      raise app.UsageError("Give --config, a checkpoint (--workdir or --checkpoint), --output.")
    directory, at = _checkpoint_dir(workdir.value, step.value, checkpoint.value)
    tokenizer, objective, mesh, variables, at = train.restore_variables(config, directory, at)
    keys = ("image", "text", "text_mask", "index")
    parts = {k: [] for k in keys}
    for batch in pipeline.as_numpy_batches(pipeline.train_dataset(config, tokenizer)):
      for k in keys:
        parts[k].append(batch[k])
      if sum(len(p) for p in parts["index"]) >= num_examples.value:
        break
    data = {k: np.concatenate(v)[:num_examples.value] for k, v in parts.items()}
    perm, is_noisy = swap_captions(len(data["index"]), corrupt.value)
    data["text"], data["text_mask"] = data["text"][perm], data["text_mask"][perm]
    encoders = embedding.jitted_encoders(objective.model)
    chunks = lambda names: [{k: data[k][i:i + batch_size.value] for k in names}
                            for i in range(0, len(data["index"]), batch_size.value)]
    images = embedding.embed_batches(encoders.image, variables, chunks(["image"]), ("image",),
                                     mesh, batch_size.value)
    texts = embedding.embed_batches(encoders.text, variables, chunks(["text", "text_mask"]),
                                    ("text", "text_mask"), mesh, batch_size.value)
    scale = float(np.exp(np.asarray(variables["params"].get("logit_scale", np.log(100.0)))))
    result = lsa(images, texts, scale, rounds=rounds.value, select_fraction=select.value)
    extra = dict(step=int(at))
    if corrupt.value > 0:
      extra.update(num_corrupted=int(is_noisy.sum()), **detection_metrics(result, is_noisy))
    summary = write(output.value, result, data["index"], extra)
    if jax.process_index() == 0:
      print(json.dumps(summary, indent=2, sort_keys=True))

  app.run(run)


if __name__ == "__main__":
  main()

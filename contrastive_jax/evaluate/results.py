"""Benchmark bookkeeping: one JSON result per (model, dataset, task), a combined markdown
table, and a feature cache that lets several tasks reuse one embedding pass.

A result file holds ``{"model", "dataset", "task", "metrics", "metadata"}`` (CLIP_benchmark
writes ``dataset``/``model``/``task``/``metrics`` at the top level too); NaN or infinite metric
values are written as ``null``. Paths may be local or any ``tf.io.gfile`` file system (GCS).
Writes go to a temporary name first and are renamed into place.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# Metric shown for a result in the combined table when none is asked for: the first present.
PRIMARY_METRICS = ("acc1", "mean_average_precision", "image_retrieval_recall@5",
                   "t2i_recall@5", "text_retrieval_recall@5", "i2t_recall@5")


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "_"


def _file_name(parts: Sequence, ext: str) -> str:
  """Readable slug of ``parts`` plus a hash of their exact values (slugs may collide)."""
  digest = hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:10]
  return "__".join(_slug(p) for p in parts) + f"__{digest}.{ext}"


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(float(value)) else None
  return value


def _atomic_write(path: str, data: bytes) -> None:
  tf.io.gfile.makedirs(os.path.dirname(path) or ".")
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _version() -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version("contrastive_jax")
  except Exception:  # pylint: disable=broad-except
    return None


def result_path(out_dir: str, model: str, dataset: str, task: str) -> str:
  """Where :func:`write_result` puts the result of ``(model, dataset, task)``."""
  return os.path.join(out_dir, _file_name((model, dataset, task), "json"))


def write_result(out_dir: str, model: str, dataset: str, task: str, metrics: Mapping,
                 metadata: Optional[Mapping] = None) -> str:
  """Writes (or replaces) the JSON result of one (model, dataset, task); returns its path.

  Args:
    out_dir: results directory (created if needed).
    model: model id (e.g. a checkpoint path or ``"ViT-B-32/openai"``).
    dataset: dataset name (e.g. a TFDS name).
    task: e.g. ``"zeroshot_classification"``, ``"linear_probe"``, ``"zeroshot_retrieval"``.
    metrics: ``{name: number}`` (numpy scalars allowed).
    metadata: anything JSON-able to keep beside (split, number of examples, seed, ...);
      ``created`` (UTC time) and ``contrastive_jax_version`` are added.
  """
  meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "contrastive_jax_version": _version()}
  meta.update(metadata or {})
  record = {"model": model, "dataset": dataset, "task": task, "metrics": _jsonable(metrics),
            "metadata": _jsonable(meta)}
  path = result_path(out_dir, model, dataset, task)
  text = json.dumps(record, indent=1, sort_keys=False, allow_nan=False) + "\n"
  _atomic_write(path, text.encode("utf-8"))
  return path


def load_results(out_dir: str) -> List[Dict]:
  """Every result record in ``out_dir`` (JSON files with ``model``/``dataset``/``task``/
  ``metrics``), sorted by (dataset, task, model)."""
  records = []
  for path in tf.io.gfile.glob(os.path.join(out_dir, "*.json")):
    with tf.io.gfile.GFile(path) as f:
      rec = json.load(f)
    if isinstance(rec, dict) and {"model", "dataset", "task", "metrics"} <= rec.keys():
      records.append(rec)
  return sorted(records, key=lambda r: (r["dataset"], r["task"], r["model"]))


def _primary(metrics: Mapping, metric: Optional[str]) -> Optional[str]:
  if metric is not None:
    return metric if metric in metrics else None
  for name in PRIMARY_METRICS:
    if name in metrics:
      return name
  return None


def combined_table(out_dir: str, metric: Optional[str] = None, scale: float = 100.0,
                   digits: int = 2) -> str:
  """Markdown table of every result in ``out_dir``: one row per (dataset, task), one column
  per model, cells ``scale · metric`` (default: percent); a final ``average`` row averages a
  model's column over the rows where every model has a value.

  Args:
    out_dir: results directory of :func:`write_result`.
    metric: the metric to show; default per result the first of :data:`PRIMARY_METRICS`
      present (the row label names it). Missing values show as ``-``.
    scale: multiplier of the shown values.
    digits: decimals.
  """
  records = load_results(out_dir)
  models = sorted({r["model"] for r in records})
  rows: Dict[Tuple[str, str], Dict[str, float]] = {}
  row_metric: Dict[Tuple[str, str], str] = {}
  for r in records:
    name = _primary(r["metrics"], metric)
    value = r["metrics"].get(name) if name else None
    if value is None:
      continue
    key = (r["dataset"], r["task"])
    rows.setdefault(key, {})[r["model"]] = float(value) * scale
    row_metric.setdefault(key, name)
  fmt = lambda v: "-" if v is None else f"{v:.{digits}f}"
  lines = ["| dataset | task | metric | " + " | ".join(models) + " |",
           "|---|---|---|" + "---:|" * len(models)]
  for key in sorted(rows):
    cells = [fmt(rows[key].get(m)) for m in models]
    lines.append(f"| {key[0]} | {key[1]} | {row_metric[key]} | " + " | ".join(cells) + " |")
  complete = [k for k in rows if all(m in rows[k] for m in models)]
  if complete and models:
    means = [fmt(float(np.mean([rows[k][m] for k in complete]))) for m in models]
    lines.append(f"| average | {len(complete)} rows | | " + " | ".join(means) + " |")
  return "\n".join(lines) + "\n"


class FeatureCache:
  """``.npz`` files of embedded splits, keyed by ``(model_id, dataset, split, n)``.

  ``n`` is the number of examples embedded (``None``: the whole split), so a subset and the
  full split are different entries. Every file stores its key and a read checks it.
  """

  def __init__(self, directory: str):
    self.directory = directory

  @staticmethod
  def _key(model_id, dataset, split, n) -> List[str]:
    return [str(model_id), str(dataset), str(split), "all" if n is None else str(int(n))]

  def path(self, model_id: str, dataset: str, split: str, n: Optional[int] = None) -> str:
    """The file of one entry."""
    return os.path.join(self.directory, _file_name(self._key(model_id, dataset, split, n), "npz"))

  def get(self, model_id: str, dataset: str, split: str, n: Optional[int] = None):
    """``(features, labels)`` (``labels`` ``None`` if none were stored), or ``None`` if absent."""
    path = self.path(model_id, dataset, split, n)
    if not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path, "rb") as f:
      data = np.load(io.BytesIO(f.read()), allow_pickle=False)
      if json.loads(str(data["key"])) != self._key(model_id, dataset, split, n):
        return None
      labels = data["labels"] if "labels" in data.files else None
      return data["features"], labels

  def put(self, model_id: str, dataset: str, split: str, n: Optional[int], features,
          labels=None) -> str:
    """Stores ``features`` ``[N, D]`` (and ``labels`` ``[N]``); returns the file path."""
    arrays = {"features": np.asarray(features),
              "key": np.asarray(json.dumps(self._key(model_id, dataset, split, n)))}
    if labels is not None:
      arrays["labels"] = np.asarray(labels)
      if len(arrays["labels"]) != len(arrays["features"]):
        raise ValueError("features and labels differ in length.")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = self.path(model_id, dataset, split, n)
    _atomic_write(path, buf.getvalue())
    return path

  def get_or_compute(self, model_id: str, dataset: str, split: str, n: Optional[int],
                     compute: Callable[[], Tuple[np.ndarray, Optional[np.ndarray]]]):
    """The cached ``(features, labels)``, or ``compute()``'s, stored first."""
    hit = self.get(model_id, dataset, split, n)
    if hit is not None:
      return hit
    features, labels = compute()
    self.put(model_id, dataset, split, n, features, labels)
    return self.get(model_id, dataset, split, n)

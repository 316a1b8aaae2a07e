"""Metric writers: clu's TensorBoard + logging writers, plus a plain-text JSON-lines log."""

from __future__ import annotations

import json
import logging as std_logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends ``{"step": s, name: value, ...}`` lines to ``path`` (scalars only)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: str, *, name: str = "metrics") -> metric_writers.MetricWriter:
  """TensorBoard + logging + ``<workdir>/<name>.jsonl`` on process 0; logging elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, f"{name}.jsonl")),
  ])


def read_jsonl(path: str) -> list:
  """The records a :class:`JsonlWriter` wrote."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO-level records that libraries (orbax) emit on every checkpoint."""

  def __init__(self, path_parts):
    super().__init__()
    self._parts = tuple(path_parts)

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        p in record.pathname for p in self._parts)


def quiet_library_logs(path_parts=("/orbax/",)) -> None:
  """Keeps the training log readable: orbax's per-save INFO lines are dropped."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo(path_parts))

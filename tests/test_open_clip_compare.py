"""benchmarks/open_clip_compare.py: the skip path, and a quick real run when open_clip is
installed (no timing assertions)."""

import importlib.util
import math

import pytest

from conftest import REPO


def _load():
  spec = importlib.util.spec_from_file_location(
      "open_clip_compare", REPO / "benchmarks" / "open_clip_compare.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("missing", ["torch", "open_clip"])
def test_missing_dependency_skips_with_the_failed_import_and_the_pip_command(
    monkeypatch, capsys, missing):
  bench = _load()

  def fake_import(name):
    if name == missing:
      raise ModuleNotFoundError(f"No module named '{name}'")
    return None  # present (not loaded here)

  monkeypatch.setattr(bench, "_import", fake_import)
  result = bench.run(quick=True)
  assert set(result) == {"skipped"}
  assert f"`import {missing}` failed" in result["skipped"]
  assert "pip install" in result["skipped"] and "open_clip_torch" in result["skipped"]
  bench.main(["--quick"])  # the CLI prints the message and returns normally (exit code 0)
  assert f"`import {missing}` failed" in capsys.readouterr().out


def test_synthetic_batch_ends_every_text_with_the_largest_id():
  bench = _load()
  cfg = bench.CONFIGS["quick"]
  batch = bench.synthetic_batch(cfg)
  lengths = batch["text_mask"].sum(1)
  rows = range(cfg["batch"])
  # Our mask-based end-of-text position is open_clip's argmax position.
  assert (batch["text"].argmax(1) == lengths - 1).all()
  assert (batch["text"][rows, lengths - 1] == cfg["vocab_size"] - 1).all()
  assert (batch["text"][~batch["text_mask"]] == 0).all()
  assert batch["image"].shape == (cfg["batch"], cfg["image_size"], cfg["image_size"], 3)


def test_learning_rate_matches_the_library_schedule():
  bench = _load()
  import ml_collections
  from contrastive_jax import optim
  opt = bench.OPTIMIZER
  schedule = optim.learning_rate_schedule(ml_collections.ConfigDict(opt), opt["total_steps"])
  for step in (0, 3, 10, 11, 5000, 9999):
    assert bench.learning_rate(step) == pytest.approx(float(schedule(step)), rel=1e-5, abs=1e-9)


def test_quick_run_times_both_sides_on_the_same_model():
  bench = _load()
  # Not importorskip: torch must not load beside TensorFlow (run checks in a subprocess).
  result = bench.run(quick=True, threads=1, steps=2, rounds=2)
  if "skipped" in result:
    pytest.skip(result["skipped"])
  # Same architecture: our patch-embedding bias (+W) stands for open_clip's class-token
  # position (+W); everything else maps one to one.
  assert result["params_ours"] == result["params_open_clip"] > 0
  for key in ("step_ms_ours", "step_ms_open_clip", "cpu_ms_ours", "cpu_ms_open_clip", "ratio"):
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result["met"] == (result["ratio"] <= result["goal"])
  assert all(math.isfinite(v) for v in result["loss"].values())
  # Each side ran alone in its process, pinned to one CPU.
  for side in ("ours", "open_clip"):
    assert result["thread_evidence"][side]["affinity"] == [
        result["thread_evidence"][side]["affinity"][0]]
  assert "xla_force_host_platform_device_count" not in result["xla_flags"]
  assert result["versions"]["jax"] and result["versions"]["open_clip"]

"""``benchmarks/run.py`` and its parts in ``--quick`` mode: every code path, no timing goals.

The parts run in this process (8 simulated devices from conftest), their results go through
the real report writer; one test drives ``run.py`` itself, with its subprocesses.
"""

import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"


def _load(name):
  if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # run.py / report.py import their siblings
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quick_results():
  """Real quick results of the parts that need no extra packages (one compile each)."""
  return {
      "loss_memory": _load("loss_memory").run(quick=True, batches=(128, 256),
                                              filip_batches=(16, 32), device_counts=(2, 8)),
      "step_overhead": _load("step_overhead").run(quick=True, steps=1, rounds=1),
      "default_run": _load("default_run").run(quick=True),
  }


def test_loss_memory_lean_forms_grow_linearly_and_shrink_with_devices(quick_results):
  from contrastive_jax.losses import memory_profile
  result = quick_results["loss_memory"]
  names = set(memory_profile.LOSSES + memory_profile.MULTI_POSITIVE_LOSSES
              + memory_profile.TOKEN_LOSSES)
  assert set(result["batch"]) == names and set(result["devices"]) == names
  for name, entry in result["batch"].items():
    (b1, ref1, lean1), (b2, ref2, lean2) = entry["rows"]
    assert b2 == 2 * b1 and lean2 < ref2, name
    # The global view's logits make it super-linear; the ring stays near-linear.
    assert entry["slope_lean"] < entry["slope_reference"] and entry["slope_lean"] < 1.2, name
  for name, entry in result["devices"].items():
    (w1, _, lean1), (w2, _, lean2) = entry["rows"]
    assert (w1, w2) == (2, 8) and lean2 < lean1 / 2, name
    assert entry["met"] == (entry["slope_lean"] <= -0.9)


def test_step_overhead_times_the_trainer_step_and_the_encoders(quick_results):
  r = quick_results["step_overhead"]
  assert r["devices"] == 8 and r["global_batch"] == 16 and r["params"] > 0
  assert r["full_step_ms"] > 0 and r["encoders_step_ms"] > 0
  assert math.isclose(r["ratio"], r["full_step_ms"] / r["encoders_step_ms"], rel_tol=1e-3)


def test_default_run_reads_the_trainers_first_step_and_rate(quick_results):
  r = quick_results["default_run"]
  assert r["steps"] == 20 and len(r["steps_per_s_reports"]) == 2  # logged every 10 steps
  assert 0 < r["compile_s"] < r["first_step_s"] and r["steps_per_s"] > 0
  assert r["met"] == (r["compile_s"] < 30)


def test_report_writes_goals_tables_and_plots(quick_results, tmp_path):
  report = _load("report")
  results = dict(quick_results)
  results["open_clip"] = {"skipped": "torch is not installed: pip install torch open_clip_torch"}
  results["gpu"] = {"error": "exit status 1:\nTraceback ...\nRuntimeError: boom"}
  path = report.write(results, str(tmp_path), quick=True)
  text = open(path).read()
  assert "| measure | goal | result | met |" in text
  assert "full step ÷ encoders fwd+bwd" in text and "compile time of the default" in text
  assert "Skipped: torch is not installed" in text and "RuntimeError: boom" in text
  for png in ("loss_memory_batch", "loss_memory_devices", "step_overhead"):
    data = (tmp_path / "plots" / f"{png}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png}.png" in text
  saved = json.loads((tmp_path / "results" / "run.json").read_text())
  assert saved["step_overhead"]["ratio"] == quick_results["step_overhead"]["ratio"]


def test_run_py_runs_parts_in_subprocesses_and_reports(tmp_path):
  run = _load("run")
  with pytest.raises(SystemExit):
    run.main(["--parts", "nonsense"])
  # open_clip: without torch it reports a clear skip; with it, the quick comparison.
  status = run.main(["--quick", "--parts", "open_clip", "--output_dir", str(tmp_path)])
  assert status == 0
  saved = json.loads((tmp_path / "results" / "run.json").read_text())["open_clip"]
  text = (tmp_path / "RESULTS.md").read_text()
  if "skipped" in saved:
    assert "torch" in saved["skipped"] and "Skipped:" in text
  else:
    assert saved["ratio"] > 0 and "ours ms" in text
  env = run.part_env(8)
  assert env["JAX_PLATFORMS"] == "cpu"
  assert "--xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
  assert "device_count" not in run.part_env(None)["XLA_FLAGS"]

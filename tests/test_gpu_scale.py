"""benchmarks/gpu_scale.py: its code paths on CPU at tiny sizes (no timing assertions)."""

import importlib.util
import math
import types

import jax
import numpy as np
import pytest

from conftest import REPO


def _load():
  spec = importlib.util.spec_from_file_location("gpu_scale", REPO / "benchmarks" / "gpu_scale.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load()
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456 bytes."


@pytest.fixture(scope="module")
def quick():
  """One quick run on the 8 devices; the step builder runs out of memory at batch 256."""
  real = bench.compile_step

  def compile_step(config, *args):
    if config.batch_size >= 256:
      raise jax.errors.JaxRuntimeError(OOM)
    return real(config, *args)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(bench, "compile_step", compile_step)
    return bench.run(quick=True, max_batch=512)


def _hand_count(config, batch):
  """Forward matmul FLOPs listed one matmul at a time (2 · rows · in · out)."""
  m, size, length = config.model, config.data.image_size, config.tokenizer.context_length
  e = m.embed_dim

  def block(rows, width, seq):  # one encoder block on `rows` tokens of sequences of `seq`
    mlp = 4 * width
    proj = 4 * 2 * rows * width * width  # q, k, v, out
    attention = 2 * (2 * rows * seq * width)  # q kᵀ per head summed, then p v
    return proj + attention + 2 * rows * width * mlp + 2 * rows * mlp * width

  p = m.image.patch_size
  patches = (size // p) ** 2
  image = (2 * patches * (p * p * 3) * m.image.width
           + m.image.depth * block(patches + 1, m.image.width, patches + 1)
           + 2 * m.image.width * e)
  text = m.text.depth * block(length, m.text.width, length) + 2 * m.text.width * e
  return 3 * (batch * (image + text) + 2 * batch * batch * e)


def test_analytic_flops_equal_a_hand_count():
  config = bench.make_config(True, 8, 8, 8)
  assert config.model.image.depth == 1 and config.model.image.width == 32  # the tiny CLIP
  for batch in (64, 512):
    assert bench.analytic_flops(config, batch)["train_step"] == _hand_count(config, batch)
  # ViT-B/16 (224 px, 197 tokens) + the 12-layer text tower at 77 tokens: the image tower
  # is the well-known ~17.6 GMACs per image.
  b16 = bench.make_config(False, 256, 1, 256)
  flops = bench.analytic_flops(b16, 256)
  assert 34.5e9 < flops["image_forward_per_sample"] < 35.5e9
  assert flops["train_step"] == _hand_count(b16, 256)


def test_cost_analysis_flops_close_to_the_analytic_count(quick):
  m = quick["mfu"]
  assert m["analytic_flops_per_device"] == m["analytic_flops_per_step"] / quick["devices"]
  # The compiled per-device program also counts element-wise work (norms, GELU, softmax,
  # Adam), a few % for the tiny model; a missing tower or a wrong ×3 would leave [0.9, 1.3].
  assert 0.9 < m["cost_over_analytic"] < 1.3


def test_mfu_is_none_on_cpu_and_computed_from_a_given_peak(quick):
  m = quick["mfu"]
  assert quick["platform"] == "cpu" and m["mfu"] is None and m["peak_tflops_per_device"] is None
  assert "cpu" in m["peak_source"] and "--peak_tflops" in m["peak_source"]
  step_s, n = m["step_ms"] / 1e3, quick["devices"]
  report = bench.mfu_report(m["analytic_flops_per_step"], step_s, n, "cpu", peak_tflops=0.5)
  assert report["peak_source"] == "--peak_tflops"
  assert math.isclose(report["mfu"], m["analytic_flops_per_step"] / (step_s * n * 0.5e12))
  assert math.isclose(report["achieved_tflops_per_device"], m["achieved_tflops_per_device"])
  table = bench.table(quick)
  assert "MFU (analytic FLOPs" in table and "None (no verified bf16 peak" in table


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", None),
    ("NVIDIA H100 NVL", None), ("TPU v4", 275e12), ("TPU v4 lite", None),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_table_by_device_kind(kind, peak):
  assert bench.peak_flops(kind)[0] == peak
  assert bench.peak_flops(kind, 100.0) == (100e12, "--peak_tflops")


def test_batch_search_stops_cleanly_at_an_out_of_memory_batch(quick):
  lb = quick["largest_batch"]
  rows = {r["batch"]: r for r in lb["rows"]}
  assert list(rows) == [64, 128, 256, 512]
  assert [r["status"] for r in lb["rows"]] == [
      "trained", "trained", "failed: out of memory", "not tried: stopped after a failure"]
  assert OOM in rows[256]["error"] and "JaxRuntimeError" in rows[256]["error"]
  assert lb["largest"] == 128 and lb["step_s"] == rows[128]["step_s"] > 0
  assert rows[64]["accum_steps"] == 1 and rows[128]["accum_steps"] == 2  # GradCache row
  for b in (64, 128):
    r = rows[b]
    assert math.isfinite(r["loss"]) and r["memory"]["temp"] > 0 and r["memory"]["argument"] > 0
    assert r["embedding_bytes"] == b * 32 * 4 and r["loss_temp_bytes"] > 0
  assert rows[64]["step_s"] == quick["mfu"]["step_ms"] / 1e3  # the MFU step's own row
  assert lb["loss_temp_bytes"] == rows[128]["loss_temp_bytes"] and lb["loss_goal_met"]
  assert not lb["batch_goal_met"] and lb["compile_s_accum"][0] > 0
  assert "| 256 | - | failed: out of memory |" in bench.table(quick)


def test_search_skips_batches_over_the_time_budget():
  clock = types.SimpleNamespace(now=0.0)
  tried = []

  def attempt(b):
    tried.append(b)
    clock.now += 2.0 + b / 100  # setup 2 s, 1 s per 100 rows
    return {"batch": b, "status": "trained", "step_s": b / 100, "setup_s": 2.0}

  rows = bench.search([100, 200, 400, 800], attempt, deadline=12.0, clock=lambda: clock.now)
  # After 100 (t = 3) and 200 (t = 7): 400 would take 4 + 2 -> t = 13 > 12, 800 even more.
  assert tried == [100, 200]
  assert [r["status"] for r in rows] == ["trained", "trained", "not tried: time budget",
                                         "not tried: time budget"]
  assert rows[2]["estimated_s"] == 6.0 and rows[3]["estimated_s"] == 10.0


def test_search_reports_other_errors_and_non_finite_losses():
  def attempt(b):
    if b == 4:
      raise ValueError("compile failed")
    return {"batch": b, "status": "trained", "step_s": 0.0, "setup_s": 0.0}

  rows = bench.search([1, 2, 4, 8], attempt, deadline=math.inf)
  assert [r["status"] for r in rows] == ["trained", "trained", "failed: error",
                                         "not tried: stopped after a failure"]
  assert rows[2]["error"] == "ValueError: compile failed"
  nan = lambda b: {"batch": b, "status": "failed: non-finite loss", "step_s": 0, "setup_s": 0}
  assert [r["status"] for r in bench.search([1, 2], nan, deadline=math.inf)] == [
      "failed: non-finite loss", "not tried: stopped after a failure"]


def test_batch_schedule():
  assert bench.batch_schedule(256, 2 * 262_144, 4) == [
      256, 1024, 4096, 16384, 65536, 262_144, 524_288]
  assert bench.batch_schedule(256, 2 * 262_144, 2)[-3:] == [131_072, 262_144, 524_288]
  assert bench.batch_schedule(64, 512, 2) == [64, 128, 256, 512]
  assert bench.batch_schedule(64, 300, 2) == [64, 128, 256]


def test_synthetic_batch_is_made_on_the_devices():
  from contrastive_jax import parallel
  config = bench.make_config(True, 8, 8, 8)
  mesh = parallel.make_mesh(-1)
  spec = bench.batch_spec(config, 64, mesh, "uint8")
  batch = bench.make_batch(spec, 258)
  assert batch["image"].dtype == np.uint8 and batch["image"].sharding == spec["image"].sharding
  text, mask = np.asarray(batch["text"]), np.asarray(batch["text_mask"])
  lengths = mask.sum(1)
  assert lengths.min() >= 8 and lengths.max() < 32
  assert (text[np.arange(64), lengths - 1] == 257).all()  # end-of-text last
  assert ((text > 0) == mask).all() and (text[mask] < 258).all()
  image = np.asarray(bench.make_batch(spec, 258, pool=16)["image"])  # 16 images, shifted
  np.testing.assert_array_equal(image[16:32], image[:16] + np.uint8(1))
  assert len({row.tobytes() for row in image}) == 64


def test_benchmark_step_is_make_steps_step(monkeypatch):
  """The benchmark's jitted step lowers to the program make_step builds (tiny CLIP)."""
  import functools
  from contrastive_jax import optim, parallel, partitioning, train_state
  from contrastive_jax.objectives import make_objective
  mesh = parallel.make_mesh(-1)
  config = bench.make_config(True, 8, 8, 8)
  config.batch_size, config.parallel.accum_steps = 128, 2
  objective = make_objective(config, types.SimpleNamespace(vocab_size=258, context_length=32))
  optimizer = optim.make_optimizer(config.optimizer, config.total_steps)
  batch = bench.batch_spec(config, 128, mesh, "uint8")
  create = functools.partial(train_state.create, objective, optimizer, seed=0)
  abstract = jax.eval_shape(create, batch)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0), batch)[0]
  shardings = partitioning.state_shardings(
      abstract, partitioning.param_shardings(boxed, mesh), optimizer, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings)
  built, jit = [], jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: built.append(jit(*a, **k)) or built[-1])
  train_state.make_step(config, objective, optimizer, mesh, shardings)
  (library_step,) = built
  ours = bench.jit_step(config, objective, optimizer, mesh, shardings)
  assert ours.lower(state, batch).as_text() == library_step.lower(state, batch).as_text()
  config.parallel.accum_steps = 4  # and the comparison can tell programs apart
  other = bench.jit_step(config, objective, optimizer, mesh, shardings)
  assert other.lower(state, batch).as_text() != library_step.lower(state, batch).as_text()

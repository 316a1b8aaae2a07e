"""The benchmark scripts run (smoke test on the tiny config; no timing assertions)."""

import importlib.util
import math

from conftest import REPO, tiny_config


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_step_speed_measures_the_library_step():
  bench = _load("train_step_speed")
  config = tiny_config()
  batch = bench.synthetic_batch(config, 16)
  lengths = batch["text_mask"].sum(1)
  assert (batch["text"][range(16), lengths - 1] == bench.BYTE_VOCAB - 1).all()  # EOT last
  row = bench.measure(config, 16, "float32", steps=1, mode="jit")
  assert row["devices"] == 8 and row["finite"] and math.isfinite(row["step_ms"])
  assert row["loss_after"] < math.log(16) + 1


def test_compare_objectives_writes_its_table_into_a_readme(tmp_path):
  bench = _load("compare_objectives")
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{bench.START}\nold table\n{bench.END}\noutro\n")
  out = tmp_path / "rows.json"
  bench.main(["--objectives", "clip", "--size", "tiny", "--steps", "3", "--workdir",
              str(tmp_path / "runs"), "--output", str(out), "--readme", str(readme)])
  import json
  (row,) = json.loads(out.read_text())
  assert row["objective"] == "clip" and row["steps"] == 3
  assert 0.0 <= row["zeroshot_acc1"] <= 1.0
  text = readme.read_text()
  assert "old table" not in text and "| clip | " in text
  assert text.startswith("intro\n") and text.endswith("outro\n")


def test_ssl_fashion_mnist_reports_features_and_raw_pixels(tmp_path):
  import json
  import pytest
  from contrastive_jax.data import fashion_mnist
  if not fashion_mnist.available():
    pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
  bench = _load("ssl_fashion_mnist")
  start, end = bench.MARKERS
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{start}\nold table\n{end}\noutro\n")
  out = tmp_path / "results.json"
  bench.main(["--methods", "simclr", "--size", "tiny", "--steps", "3", "--workdir",
              str(tmp_path / "runs"), "--output", str(out), "--readme", str(readme)])
  results = json.loads(out.read_text())
  (run,) = results["runs"]
  assert run["method"] == "simclr" and run["steps"] == 3
  assert run["knn_curve"] == [[3, run["knn_acc1"]]]
  # Raw pixels, same evaluator and the same 256 / 128 images: far above chance (10 classes).
  assert results["raw_pixels"]["knn_acc1"] > 0.5
  text = readme.read_text()
  assert "old table" not in text and "| raw pixels |" in text and "| simclr |" in text


def test_input_pipeline_measures_decoding_and_input_wait(tmp_path):
  bench = _load("input_pipeline")
  jpegs = bench.synthetic_jpegs(2)
  import tensorflow as tf
  assert tf.io.extract_jpeg_shape(jpegs[0]).numpy().tolist() == [375, 500, 3]
  decode = bench.run_decode(8, 32, seconds=0.2, variants=("decode_crop", "center_crop"),
                            rounds=1)
  assert {r["variant"] for r in decode["rows"]} == {"decode_crop", "center_crop"}
  assert all(r["images_per_s"] > 0 for r in decode["rows"])
  wait = bench.run_input_wait(16, 4, "tiny", 8, 32, str(tmp_path), alone_seconds=0.2)
  assert 0 <= wait["wait_fraction"] <= 1 and wait["devices"] == 8
  assert wait["pipeline_alone_images_per_s"] > 0


def test_eval_throughput_compares_evaluation_with_the_plain_forward():
  bench = _load("eval_throughput")
  config = bench.load_config(str(REPO / "configs/clip_shards.py") + ":data=unused,size=tiny")
  row = bench.measure(config, 16, 2, rounds=1)
  assert row["devices"] == 8 and row["forward_images_per_s"] > 0 and row["ratio"] > 0


def test_scale_memory_reports_what_each_setting_divides():
  bench = _load("scale_memory")
  config = bench.model_config(64, 1, 32, 32)
  base = bench.measure(config)
  both = bench.measure(config, fsdp=4, accum=4)
  # Compiled sizes, deterministic: FSDP splits the state, GradCache the activations.
  assert both["state_bytes"] < 0.35 * base["state_bytes"]
  assert both["activation_bytes"] * 4 == base["activation_bytes"]
  assert both["temp_bytes"] < base["temp_bytes"]


def test_objectives_table_lists_every_objective_and_loss(tmp_path):
  from contrastive_jax import losses, objectives
  bench = _load("objectives_table")
  named = set(bench.CATALOGUE)
  assert set(objectives.OBJECTIVES) <= named, set(objectives.OBJECTIVES) - named
  for name, (_, scope, _) in bench.CATALOGUE.items():
    if scope == "loss":
      assert callable(getattr(losses, name)), name
    elif scope in ("option", "image-only", "image-text", "labels", "adaptation"):
      assert bench.configs_of(name), name  # a config to run it with
  start, end = bench.MARKERS
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{start}\nold\n{end}\n")
  bench.main(["--readme", str(readme)])
  text = readme.read_text()
  assert "old" not in text and "| `hydra` | Wu et al. 2024" in text
  assert "| `clip` |" in text and "zero-shot acc1 (shapes," in text


def test_compare_objectives_runs_the_image_only_family(tmp_path):
  import json
  import pytest
  from contrastive_jax.data import fashion_mnist
  if not fashion_mnist.available():
    pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
  bench = _load("compare_objectives")
  out = tmp_path / "results.json"
  bench.main(["--family", "image_only", "--methods", "sbcl", "--size", "tiny", "--steps", "2",
              "--workdir", str(tmp_path / "runs"), "--output", str(out)])
  (run,) = json.loads(out.read_text())["runs"]
  assert run["method"] == "sbcl" and run["steps"] == 2 and 0.0 <= run["knn_acc1"] <= 1.0

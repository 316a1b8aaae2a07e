"""The evaluation suite end to end on mocked TFDS data (real feature specs), with encoders
whose embeddings are exact, so every task's result is known."""

import glob
import json
import os

import numpy as np
import pytest

import stream_fixtures as sf
from contrastive_jax import parallel
from contrastive_jax.data import tokenizers
from contrastive_jax.evaluate import embedding, prompts, suite

SPLITS = {"train": 40, "test": 30}  # colours repeat every 40 examples
TOK = tokenizers.ByteTokenizer(context_length=96)


def _label(i):  # the label stream_fixtures gives cifar10 example i
  return int(np.random.default_rng(i).integers(10))


class OracleEncoders:
  """Images -> one-hot of their true class (recovered from the colour of example i),
  prompts -> one-hot of the class they name; captions "image i caption k" -> one-hot(i)."""

  names = prompts.load("cifar10")[0]

  @staticmethod
  def image(variables, x):
    mean, std = np.array(sf_clip_mean), np.array(sf_clip_std)
    rows = (np.asarray(x).reshape(len(x), -1, 3).mean(1) * std + mean) * 255
    ids = [sf.record_of(r) for r in rows]
    key = variables["kind"]
    return np.eye(64)[[(_label(i) if key == "class" else i) for i in ids]]

  @classmethod
  def text(cls, variables, tokens, mask):
    out = []
    for text in TOK.detokenize(np.asarray(tokens)):
      if variables["kind"] == "class":  # the longest class name in the prompt
        hits = [c for c, n in enumerate(cls.names) if n in text]
        out.append(max(hits, key=lambda c: len(cls.names[c])))
      else:
        out.append(int(text.split()[1]))
    return np.eye(64)[out]


sf_clip_mean = (0.48145466, 0.4578275, 0.40821073)
sf_clip_std = (0.26862954, 0.26130258, 0.27577711)


def _model(kind):
  encoders = embedding.Encoders(image=OracleEncoders.image, text=OracleEncoders.text,
                                image_tokens=None, text_tokens=None)
  return suite.Model(f"oracle_{kind}", encoders, {"kind": kind}, TOK, 32, "clip")


def test_every_classification_task_is_perfect_with_exact_features(tmp_path):
  mesh = parallel.make_mesh(8)
  options = suite.Options(batch_size=8, shots=1, knn_k=3)
  with sf.mock_tfds(SPLITS):
    table = suite.run(_model("class"), list(suite.TASKS), ["cifar10"], mesh, options,
                      str(tmp_path))
  files = sorted(glob.glob(str(tmp_path / "*.json")))
  tasks = {json.load(open(f))["task"] for f in files}
  assert tasks == set(suite.CLASSIFICATION_TASKS)  # retrieval skipped: no captions
  for f in files:
    result = json.load(open(f))
    assert result["metrics"]["acc1"] == 1.0, result
  assert "cifar10" in table and os.path.exists(tmp_path / "results.md")
  # Features were embedded once per split and reused by the later tasks.
  assert len(glob.glob(str(tmp_path / "features" / "*.npz"))) == 2


def test_retrieval_on_coco_uses_every_caption(tmp_path):
  mesh = parallel.make_mesh(8)
  with sf.mock_tfds({"test": 12}):
    suite.run(_model("caption"), ["retrieval", "zeroshot"], ["coco_captions"], mesh,
              suite.Options(batch_size=8), str(tmp_path))
  (path,) = glob.glob(str(tmp_path / "*.json"))
  result = json.load(open(path))
  assert result["task"] == "retrieval"
  assert all(v == 1.0 for v in result["metrics"].values())


def test_unknown_task_is_refused():
  with pytest.raises(ValueError, match="Unknown evaluation task"):
    suite.run_task("bogus", _model("class"), "cifar10", None, suite.Options())


def test_cli_evaluates_imported_clip_weights(tmp_path):
  """``python -m contrastive_jax.evaluate --clip_weights ...`` as a user runs it, on mocked
  TFDS data (a sitecustomize enters ``mock_tfds`` in the subprocess)."""
  from conftest import REPO, run_module
  import test_clip_import as tci
  sd = tci._clip_state_dict(width=64, patch=8, grid=4, depth=1, text_width=64, text_depth=1,
                            vocab=49408, context=77, embed=16, mlp=128, text_mlp=128)
  weights = tmp_path / "tiny_clip.npz"
  np.savez(weights, **sd)
  boot = tmp_path / "boot"
  boot.mkdir()
  (boot / "sitecustomize.py").write_text(
      f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nimport stream_fixtures\n"
      f"_mock = stream_fixtures.mock_tfds({{'train': 40, 'test': 16}})\n_mock.__enter__()\n")
  out = tmp_path / "results"
  done = run_module(
      ["contrastive_jax.evaluate", f"--clip_weights={weights}", "--activation=quick_gelu",
       f"--vocab={REPO / 'tests/data/bpe_simple_vocab_16e6.txt.gz'}", 
       "--tasks=zeroshot,fewshot,retrieval", "--datasets=cifar10,coco_captions",
       f"--output_dir={out}", "--batch_size=8", "--shots=1"],
      env={"PYTHONPATH": f"{boot}:{REPO}"})
  assert done.returncode == 0, done.stderr[-3000:]
  found = {(r["dataset"], r["task"]) for r in map(json.load, map(open, glob.glob(
      str(out / "*.json"))))}
  assert found == {("cifar10", "zeroshot"), ("cifar10", "fewshot"),
                   ("coco_captions", "retrieval")}
  assert "cifar10" in done.stdout and "coco_captions" in done.stdout  # the combined table


def test_zeroshot_classifier_is_the_normalised_mean_of_normalised_prompts():
  from contrastive_jax.evaluate import zeroshot
  vectors = {"a cat": [3.0, 0.0, 0.0], "the cat": [0.0, 4.0, 0.0],
             "a dog": [0.0, 0.0, 2.0], "the dog": [0.0, 0.0, 5.0]}

  def text(variables, tokens, mask):
    return np.array([vectors[t] for t in TOK.detokenize(np.asarray(tokens))])

  encoders = embedding.Encoders(image=None, text=text, image_tokens=None, text_tokens=None)
  weights = zeroshot.classifier(encoders, None, TOK, ["cat", "dog"], ["a {}", "the {}"],
                                parallel.make_mesh(8), 8)
  # cat: mean of (1, 0, 0) and (0, 1, 0), normalised; dog: both prompts point along z.
  np.testing.assert_allclose(weights, [[2 ** -0.5, 2 ** -0.5, 0], [0, 0, 1]], atol=1e-6)


def test_retrieval_on_grouped_caption_shards(tmp_path):
  """A CSV with one row per caption -> make_shards --group_captions -> retrieval over
  ``shards:GLOB`` with all captions of each image (as for Flickr30k's Karpathy split)."""
  import tensorflow as tf
  from contrastive_jax.data import make_shards
  rows = ["filepath,title"]
  for i in range(10):
    name = f"img{i}.jpg"
    pixels = np.broadcast_to(sf.colour(i), (24, 32, 3)).copy()
    (tmp_path / name).write_bytes(tf.io.encode_jpeg(pixels, quality=95).numpy())
    rows += [f"{name},image {i} caption {k}" for k in range(1 + i % 3)]
  (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
  stats = make_shards.convert(str(tmp_path / "split.csv"), str(tmp_path / "shards"),
                              group=True, examples_per_shard=4)
  assert stats["written"] == 10
  mesh = parallel.make_mesh(8)
  out = tmp_path / "results"
  suite.run(_model("caption"), ["retrieval"], [f"shards:{tmp_path}/shards/*.tfrecord"], mesh,
            suite.Options(batch_size=8), str(out))
  (path,) = glob.glob(str(out / "*.json"))
  result = json.load(open(path))
  assert all(v == 1.0 for v in result["metrics"].values()), result

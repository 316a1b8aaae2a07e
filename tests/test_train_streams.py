"""The trainer on stream sources: CLIP on shards (crash + exact resume, bad-record metrics)
and on COCO captions from (mocked) TFDS with retrieval over all captions."""

import math
import os

import jax
import numpy as np
import pytest

import stream_fixtures as sf
from conftest import load_config
from contrastive_jax import checkpointing, train, writers
from contrastive_jax.data import pipeline

STEPS = 8


class Crash(RuntimeError):
  pass


def _shards_config(pattern, **args):
  arg = ",".join([f"data={pattern}", "size=tiny", f"steps={STEPS}", "batch=8"] +
                 [f"{k}={v}" for k, v in args.items()])
  config = load_config("clip_shards", arg)
  config.checkpoint.every_steps, config.checkpoint.async_save = 3, False
  config.log_every_steps = 2
  return config


@pytest.fixture(scope="module")
def shard_info(tmp_path_factory):
  return sf.write_shards(str(tmp_path_factory.mktemp("shards")))


def test_crashed_shards_run_resumes_exactly(shard_info, tmp_path, monkeypatch):
  config = _shards_config(shard_info["pattern"])
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(config, reference)

  # Crash while reading the batch of step 5: the newest checkpoint is step 3.
  crashed = str(tmp_path / "crashed")
  real = pipeline.as_numpy_batches

  def failing(ds):
    for i, batch in enumerate(real(ds)):
      if i == 4:
        raise Crash("input died")
      yield batch

  monkeypatch.setattr(pipeline, "as_numpy_batches", failing)
  with pytest.raises(Crash):
    train.train_and_evaluate(config, crashed)
  monkeypatch.setattr(pipeline, "as_numpy_batches", real)
  assert checkpointing.manager(crashed, keep=3).latest_step() == 3
  meta = checkpointing.read_meta(checkpointing.manager(crashed, keep=3), 3)
  assert meta["data_position"]["hosts"][0]["epoch"] == 0  # a mid-epoch position
  train.train_and_evaluate(config, crashed)

  ckpt = lambda d: os.path.join(d, "checkpoints")  # noqa: E731
  ours = train.restore_variables(config, ckpt(crashed))[3]
  theirs = train.restore_variables(config, ckpt(reference))[3]
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)
  # The bad-record counters are training metrics, and resuming does not recount.
  last = lambda d: [r for r in writers.read_jsonl(os.path.join(d, "metrics.jsonl"))  # noqa
                    if "data/skipped_undecodable" in r][-1]
  assert last(crashed) == last(reference)
  # 64 good records read: all of epoch 0 (42) and the start of epoch 1.
  counts = {k[len("data/skipped_"):]: v for k, v in last(reference).items()
            if k.startswith("data/skipped_")}
  assert all(counts[k] >= n for k, n in sf.BAD_COUNTS.items()), counts
  assert last(reference)["data/converted_non_rgb"] >= sf.CONVERTED_COUNT


def test_resuming_with_another_host_count_is_refused():
  meta = {"data_position": {"step": 3, "hosts": [{"epoch": 0}, {"epoch": 0}]}}
  with pytest.raises(ValueError, match="2 hosts"):
    train.resume_data_state(meta)
  assert train.resume_data_state({"data_position": 7}) is None  # index-based sources


def test_coco_captions_from_tfds_trains_and_retrieves_with_all_captions(tmp_path, monkeypatch):
  config = load_config("clip_coco", f"size=tiny,steps={STEPS},batch=8,eval_examples=12")
  config.log_every_steps = 2
  sf.patch_tfds(monkeypatch, {"train": 40, "val": 12})
  results = train.train_and_evaluate(config, str(tmp_path))
  keys = {f"retrieval/tfds/{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  assert keys <= set(results) and all(0 <= results[k] <= 1 for k in keys)
  losses = [r["train/loss"] for r in writers.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
            if "train/loss" in r]
  assert len(losses) == STEPS // 2 and all(math.isfinite(v) for v in losses)


def test_retrieval_with_several_captions_counts_every_caption(monkeypatch):
  """12 images with 3-5 captions each: text queries are every caption (48), and with
  embeddings that identify the image exactly, every recall is 1."""
  from contrastive_jax.evaluate import retrieval
  from contrastive_jax import parallel
  config = load_config("clip_coco", "size=tiny")
  tokenizer = train.build(config)[0]
  with sf.mock_tfds({"val": 12}):
    ds = pipeline.stream_eval_dataset(config.data, tokenizer, split="val", num_captions=5)
    assert int(sum(b["text_valid"].sum() for b in ds.batch(8).as_numpy_iterator())) == 48

    class Encoders:  # image i -> e_i; caption "image i caption k" -> e_i
      @staticmethod
      def image(v, x):
        rows = np.asarray(x).reshape(len(x), -1, 3).mean(1)
        i = [sf.record_of((r * np.array([0.26862954, 0.26130258, 0.27577711]) +
                           np.array([0.48145466, 0.4578275, 0.40821073])) * 255) for r in rows]
        return np.eye(64)[i]

      @staticmethod
      def text(v, t, m):
        words = tokenizer.detokenize(np.asarray(t))
        return np.eye(64)[[int(w.split()[1]) for w in words]]

    out = retrieval.evaluate(Encoders, None, ds, parallel.make_mesh(8), 8)
  assert all(v == 1.0 for v in out.values()), out


def test_host_states_are_gathered_as_json_rows(monkeypatch):
  """Each host's data state travels to every host as a fixed-width byte row."""
  states = [{"epoch": 2, "offset": 17, "counts": {"undecodable": 1}},
            {"epoch": 2, "offset": 9, "counts": {"undecodable": 0}}]
  rows = np.stack([train._json_row(s) for s in states])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(train.multihost_utils, "process_allgather", lambda row: rows)
  assert train._gather_hosts(states[0]) == states
  assert train._data_scalars(states[0])["data/skipped_undecodable"] == 1.0
  with pytest.raises(ValueError, match="too large"):
    train._json_row({"x": "y" * 5000})

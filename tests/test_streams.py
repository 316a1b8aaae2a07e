"""Stream sources: TFRecord shards and TFDS (mocked with the real feature specs).

Bad records are skipped and counted, hosts read disjoint data that covers the split, and a
stream resumed from a saved position continues exactly as the uninterrupted one.
"""

import itertools

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import stream_fixtures as sf
from contrastive_jax.data import pipeline, records, streams, tokenizers

TOK = tokenizers.ByteTokenizer(context_length=24)
GOOD = sf.NUM_SHARDS * sf.GOOD_PER_SHARD + sf.CONVERTED_COUNT


@pytest.fixture(scope="module")
def shard_info(tmp_path_factory):
  return sf.write_shards(str(tmp_path_factory.mktemp("shards")))


def _config(data, batch_size=6):
  return ml_collections.ConfigDict(dict(batch_size=batch_size, data=dict(
      dict(image_size=16, seed=3, shuffle_window=8), **data)))


def _captions(batches):
  return [c for b in batches for c in TOK.detokenize(b["text"])]


def _take(ds, n):
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def test_one_epoch_has_every_good_record_once_and_counts_the_bad(shard_info):
  config = _config(dict(source="shards", shards=shard_info["pattern"]), batch_size=GOOD)
  batch = _take(pipeline.train_dataset(config, TOK), 2)
  first = _captions(batch[:1])
  # Window shuffling keeps epochs apart: the first GOOD good records are epoch 0 exactly.
  assert sorted(first) == sorted(shard_info["good"] | shard_info["converted"])
  state = records.host_state(batch[0])
  assert state["epoch"] == 0 and state["counts"] == dict(
      sf.BAD_COUNTS, non_rgb=0, converted_non_rgb=sf.CONVERTED_COUNT)
  # The good records' pixels survive decoding and cropping: each image is its record's colour.
  for caption, image in zip(first, batch[0]["image"]):
    if caption.startswith("caption number"):
      assert sf.record_of((image + 1) * 127.5) == int(caption.split()[-1])
  # Epoch 1 is another order of the same records, and its bad records are counted again.
  assert sorted(_captions(batch[1:])) == sorted(first) and _captions(batch[1:]) != first
  assert records.host_state(batch[1])["counts"]["undecodable"] == 2 * sf.BAD_COUNTS["undecodable"]


def test_non_rgb_skip_mode_counts_instead_of_converting(shard_info):
  config = _config(dict(source="shards", shards=shard_info["pattern"], non_rgb="skip"),
                   batch_size=GOOD - sf.CONVERTED_COUNT)
  batch = _take(pipeline.train_dataset(config, TOK), 1)[0]
  assert not set(_captions([batch])) & shard_info["converted"]
  counts = records.host_state(batch)["counts"]
  assert counts["non_rgb"] == sf.CONVERTED_COUNT and counts["converted_non_rgb"] == 0


@pytest.mark.parametrize("resume_after", [1, 4, 9])
def test_resumed_stream_continues_exactly(shard_info, resume_after):
  config = _config(dict(source="shards", shards=shard_info["pattern"]))
  full = _take(pipeline.train_dataset(config, TOK), 12)
  state = records.host_state(full[resume_after - 1])
  resumed = _take(pipeline.train_dataset(config, TOK, data_state=state), 12 - resume_after)
  for a, b in zip(full[resume_after:], resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _as_host(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_two_hosts_read_disjoint_shards_that_cover_the_data(shard_info, monkeypatch):
  seen = []
  for host in range(2):
    _as_host(monkeypatch, host, 2)
    per_host = sf.GOOD_PER_SHARD * sf.NUM_SHARDS // 2
    rows = per_host + (sf.CONVERTED_COUNT if host == 1 else 0)  # shard 1 is host 1's
    config = _config(dict(source="shards", shards=shard_info["pattern"]), batch_size=2 * rows)
    seen.append(set(_captions(_take(pipeline.train_dataset(config, TOK), 1))))
    assert len(seen[-1]) == rows
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == shard_info["good"] | shard_info["converted"]


def test_shard_errors_name_the_problem(tmp_path, shard_info, monkeypatch):
  with pytest.raises(FileNotFoundError, match="matches no files"):
    pipeline.train_dataset(_config(dict(source="shards", shards=str(tmp_path / "*.tfr"))), TOK)
  _as_host(monkeypatch, 0, 8)
  with pytest.raises(ValueError, match="4 shard files for 8 hosts"):
    pipeline.train_dataset(_config(dict(source="shards", shards=shard_info["pattern"])), TOK)


def test_caption_choice_is_keyed_by_position():
  text = tf.constant(streams.CAPTION_SEPARATOR.join(["a", " ", "b", "c"]))
  picks = {streams._choose_caption(text, streams.record_seed(0, 0, o)).numpy()
           for o in range(40)}
  assert picks == {b"a", b"b", b"c"}  # blank captions are never picked
  key = streams.record_seed(0, 2, 5)
  assert streams._choose_caption(text, key).numpy() == streams._choose_caption(text, key).numpy()


# ------------------------------------------------------------------------------------- TFDS

SPLITS = {"train": 30, "test": 12, "validation": 12, "val": 12}


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_tfds_classification_even_splits_cover_the_slice(name, monkeypatch):
  with sf.mock_tfds(SPLITS):
    seen = []
    for host in range(2):
      _as_host(monkeypatch, host, 2)
      config = _config(dict(source="tfds", name=name, split="train[:80%]", shuffle_window=4),
                       batch_size=24)  # 12 rows per host: exactly its half of 24 examples
      batch = _take(pipeline.train_dataset(config), 1)[0]
      assert "text" not in batch and batch["image"].shape == (12, 16, 16, 3)
      seen.append([sf.record_of((im + 1) * 127.5) for im in batch["image"]])
      assert len(set(seen[-1])) == 12
  assert sorted(seen[0] + seen[1]) == list(range(24))


def test_tfds_coco_captions_trains_on_one_caption_per_image():
  with sf.mock_tfds(SPLITS):
    config = _config(dict(source="tfds", name="coco_captions", split="train"), batch_size=30)
    batches = _take(pipeline.train_dataset(config, TOK), 2)
  for batch in batches:
    for caption, image in zip(_captions([batch]), batch["image"]):
      i = int(caption.split()[1])  # "image {i} caption {k}"
      assert sf.record_of((image + 1) * 127.5) == i % 40
  # A caption is drawn per read: the two epochs differ somewhere.
  assert sorted(_captions(batches[:1])) != sorted(_captions(batches[1:]))


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  config = _config(dict(source="tfds", name="cifar10", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    pipeline.train_dataset(config)
  with pytest.raises(ValueError, match="not a TFDS dataset"):
    pipeline.train_dataset(_config(dict(source="tfds", name="no_such_dataset_xyz")))

"""Tests of contrastive_jax.data.make_shards: CSV / TSV / folder inputs -> TFRecord shards."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from contrastive_jax.data import make_shards

FEATURES = {"key": tf.io.FixedLenFeature([], tf.string),
            "jpg": tf.io.FixedLenFeature([], tf.string),
            "txt": tf.io.FixedLenFeature([], tf.string),
            "width": tf.io.FixedLenFeature([], tf.int64),
            "height": tf.io.FixedLenFeature([], tf.int64)}


def _pixels(h, w, seed):
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
  return np.round(tf.image.resize(small, [h, w], "bilinear").numpy()).astype(np.uint8)


def read_shards(output_dir, image_key="jpg"):
  """All records of ``output_dir``'s shards in order, as dicts of numpy values."""
  files = sorted(tf.io.gfile.glob(os.path.join(output_dir, "*.tfrecord")))
  features = dict(FEATURES)
  if image_key != "jpg":
    features[image_key] = features.pop("jpg")
  ds = tf.data.TFRecordDataset(files).map(lambda x: tf.io.parse_single_example(x, features))
  return list(ds.as_numpy_iterator())


@pytest.fixture()
def inputs(tmp_path):
  """Images on disk: good JPEGs and a PNG, plus planted bad ones. Returns ``(dir, files)``."""
  root = tmp_path / "data"
  (root / "imgs" / "sub").mkdir(parents=True)
  files = {
      "imgs/a.jpg": tf.io.encode_jpeg(_pixels(30, 40, 0), quality=90).numpy(),
      "imgs/sub/b.jpeg": tf.io.encode_jpeg(_pixels(20, 20, 1), quality=90).numpy(),
      "imgs/c.png": tf.io.encode_png(_pixels(36, 24, 2)).numpy(),
      "imgs/d.jpg": tf.io.encode_jpeg(_pixels(16, 48, 3), quality=90).numpy(),
      "imgs/corrupt.jpg": b"\xff\xd8\xff\xe0" + b"\x13" * 200,
      "imgs/text.jpg": b"this is not an image",
      "imgs/nocap.png": tf.io.encode_png(_pixels(8, 8, 4)).numpy(),
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
  return root, files


GOOD = [("imgs/a.jpg", "a red, round thing"), ("imgs/sub/b.jpeg", "café — ünïcode \"quoted\""),
        ("imgs/c.png", "multi\nline caption"), ("imgs/d.jpg", "  padded caption  ")]
BAD = [("imgs/missing.jpg", "gone", "missing_file"), ("imgs/corrupt.jpg", "bad", "undecodable"),
       ("imgs/text.jpg", "text", "unknown_format"), ("imgs/a.jpg", "   ", "empty_caption"),
       ("", "no path", "missing_path")]


def _write_table(root, name, separator, absolute=False):
  rows = [(p, c) for p, c in GOOD[:2]] + [(p, c) for p, c, _ in BAD] + GOOD[2:]
  path = root / name
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter=separator)
    writer.writerow(["title", "filepath", "extra"])
    for image, caption in rows:
      image = str(root / image) if absolute and image else image
      writer.writerow([caption, image, "x"])
  return path


def _check_good(records, files):
  assert [r["txt"].decode() for r in records] == [c.strip() for _, c in GOOD]
  for record, (name, _) in zip(records, GOOD):
    pixels = tf.io.decode_image(files[name], channels=3).numpy()
    assert (record["height"], record["width"]) == pixels.shape[:2]
    assert record["jpg"][:3] == b"\xff\xd8\xff"
    if name.endswith(".png"):  # re-encoded: same pixels within JPEG tolerance
      decoded = tf.io.decode_jpeg(record["jpg"], channels=3).numpy().astype(np.float32)
      assert np.abs(decoded - pixels).mean() < 4.0 and np.abs(decoded - pixels).max() < 32
    else:  # JPEG: the file's bytes
      assert record["jpg"] == files[name]


@pytest.mark.parametrize("name, separator", [("pairs.csv", ","), ("pairs.tsv", "\t")])
def test_table_input(inputs, tmp_path, name, separator):
  root, files = inputs
  table = _write_table(root, name, separator)
  out = str(tmp_path / "out")
  stats = make_shards.convert(str(table), out, examples_per_shard=3, workers=2)
  records = read_shards(out)
  _check_good(records, files)
  assert [r["key"].decode() for r in records] == ["000000000", "000000001", "000000007",
                                                   "000000008"]
  assert stats["written"] == 4 and stats["shards"] == 2
  assert stats["skipped"] == {reason: 1 for _, _, reason in BAD}
  assert sorted(e["reason"] for e in stats["skipped_examples"]) == sorted(r for *_, r in BAD)
  assert sorted(os.listdir(out)) == ["00000.tfrecord", "00001.tfrecord", "_stats.json"]
  with open(os.path.join(out, "_stats.json")) as f:
    assert json.load(f) == stats
  per_shard = [sum(1 for _ in tf.data.TFRecordDataset(os.path.join(out, f)))
               for f in stats["shard_files"]]
  assert per_shard == [3, 1]


def test_absolute_paths_key_column_and_determinism(inputs, tmp_path):
  root, files = inputs
  table = _write_table(root, "abs.csv", ",", absolute=True)
  out1, out2 = str(tmp_path / "o1"), str(tmp_path / "o2")
  make_shards.convert(str(table), out1, examples_per_shard=2, key_column="extra", workers=1)
  make_shards.convert(str(table), out2, examples_per_shard=2, key_column="extra", workers=3)
  records = read_shards(out1)
  _check_good(records, files)
  assert {r["key"] for r in records} == {b"x"}
  for shard in ("00000.tfrecord", "00001.tfrecord"):
    with open(os.path.join(out1, shard), "rb") as f1, open(os.path.join(out2, shard), "rb") as f2:
      assert f1.read() == f2.read()
  with pytest.raises(ValueError, match="caption_colum"):
    make_shards.convert(str(table), str(tmp_path / "o3"), caption_column="caption")


def test_folder_input(inputs, tmp_path):
  root, files = inputs
  captions = {"imgs/a": "caption a", "imgs/sub/b": "caption b\n", "imgs/c": "caption c",
              "imgs/corrupt": "x", "imgs/text": "y"}
  for stem, caption in captions.items():
    (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
  out = str(tmp_path / "out")
  stats = make_shards.convert(str(root / "imgs"), out, examples_per_shard=10)
  records = read_shards(out)
  assert [r["key"] for r in records] == [b"a", b"c", b"sub/b"]
  assert [r["txt"] for r in records] == [b"caption a", b"caption c", b"caption b"]
  assert records[0]["jpg"] == files["imgs/a.jpg"]
  assert records[2]["jpg"] == files["imgs/sub/b.jpeg"]
  assert stats["skipped"] == {"no_caption_file": 2, "undecodable": 1, "unknown_format": 1}
  assert {e["key"] for e in stats["skipped_examples"]} == {"nocap", "d", "corrupt", "text"}


def test_resize_and_png_format(inputs, tmp_path):
  root, files = inputs
  table = _write_table(root, "pairs.csv", ",")
  out = str(tmp_path / "out")
  make_shards.convert(str(table), out, resize=24)
  sizes = [(r["width"], r["height"]) for r in read_shards(out)]
  assert sizes == [(32, 24), (20, 20), (24, 36), (48, 16)]  # only a.jpg is larger than 24
  records = read_shards(out)
  assert records[1]["jpg"] == files["imgs/sub/b.jpeg"] and records[3]["jpg"] == files["imgs/d.jpg"]
  assert tf.io.decode_jpeg(records[0]["jpg"]).shape == (24, 32, 3)
  out = str(tmp_path / "png")
  make_shards.convert(str(table), out, image_format="png")
  records = read_shards(out, "png")
  assert records[2]["png"] == files["imgs/c.png"]
  decoded = tf.io.decode_png(records[0]["png"]).numpy()
  np.testing.assert_array_equal(decoded, tf.io.decode_jpeg(files["imgs/a.jpg"]).numpy())


def test_write_shards_writes_unchecked_records(tmp_path):
  good = tf.io.encode_jpeg(_pixels(10, 14, 5)).numpy()
  records = [("k0", good, "fine"), (b"k1", b"garbage", ""), ("k2", good, b"\xff\xfe bad utf8"),
             ("k3", b"", "empty image", 7, 9)]
  out = str(tmp_path / "out")
  stats = make_shards.write_shards(records, out, examples_per_shard=3)
  got = read_shards(out)
  assert [(r["key"], r["jpg"], r["txt"]) for r in got] == [
      (b"k0", good, b"fine"), (b"k1", b"garbage", b""), (b"k2", good, b"\xff\xfe bad utf8"),
      (b"k3", b"", b"empty image")]
  assert [(r["width"], r["height"]) for r in got] == [(14, 10), (0, 0), (14, 10), (7, 9)]
  assert stats["written"] == 4 and stats["shard_files"] == ["00000.tfrecord", "00001.tfrecord"]
  with pytest.raises(FileExistsError):
    make_shards.write_shards(records, out)
  stats = make_shards.write_shards(records[:1], out, overwrite=True)  # stale shard removed
  assert sorted(os.listdir(out)) == ["00000.tfrecord", "_stats.json"]
  stats = make_shards.write_shards([], str(tmp_path / "empty"))
  assert stats["written"] == 0 and stats["shards"] == 0


def test_cli_exit_codes(inputs, tmp_path):
  root, _ = inputs
  table = _write_table(root, "pairs.csv", ",")
  out = str(tmp_path / "out")
  result = run_module(["contrastive_jax.data.make_shards", "--input", str(table),
                       "--output_dir", out, "--examples_per_shard", "2"], timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(read_shards(out)) == 4 and "missing_file" in result.stderr
  bad = root / "bad.tsv"
  bad.write_text("filepath\ttitle\nimgs/missing.jpg\tx\nimgs/text.jpg\ty\n")
  result = run_module(["contrastive_jax.data.make_shards", "--input", str(bad),
                       "--output_dir", str(tmp_path / "none")], timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  with open(tmp_path / "none" / "_stats.json") as f:
    assert json.load(f)["skipped"] == {"missing_file": 1, "unknown_format": 1}

"""Image-text pairs (a CSV/TSV file or a folder) -> TFRecord shards in img2dataset's layout.

  python -m contrastive_jax.data.make_shards --input pairs.csv --output_dir /data/shards
  python -m contrastive_jax.data.make_shards --input pairs.tsv --output_dir gs://bucket/shards \\
      --image_column filepath --caption_column title --examples_per_shard 5000 --resize 256
  python -m contrastive_jax.data.make_shards --input photos/ --output_dir /data/shards

Inputs:

* ``--input FILE.csv|FILE.tsv``: open_clip's convention, a header row naming an image path
  column (``--image_column``, default ``filepath``) and a caption column (``--caption_column``,
  default ``title``); the separator comes from the extension (``.tsv``: tab, else comma) unless
  ``--separator`` is given. Relative image paths resolve against the file's directory. Keys are
  the data row numbers (``000000000``, ...) unless ``--key_column`` names a column.
* ``--input DIR``: every image (``.jpg .jpeg .png .webp .bmp .gif``, any depth, sorted) with a
  sidecar caption file of the same stem (``a/b.jpg`` + ``a/b.txt``); the key is the path
  relative to ``DIR`` without the extension.

Output (``{output_dir}/{shard:05d}.tfrecord``, ``--examples_per_shard`` records each, and
``{output_dir}/_stats.json``): one ``tf.train.Example`` per pair with bytes features ``key``
(UTF-8), ``jpg`` (the encoded image), ``txt`` (UTF-8 caption) and int64 ``width`` /
``height`` of the stored image. JPEG inputs are copied byte for byte; other formats are decoded
(:func:`image_ops.decode_rgb`) and re-encoded as JPEG quality 95 (``--image_format png``:
store PNG under the key ``png`` instead, PNG inputs copied). ``--resize N`` shrinks images
whose shorter side is larger than ``N`` to ``N`` (aspect kept, bicubic, antialiased; smaller
images are kept as they are) before re-encoding.

Validation is the CLI's job, writing is :func:`write_shards`'s: the CLI skips a pair whose
image is missing, unreadable, of an unknown format or undecodable, or whose caption is
missing or empty, counts it by reason and lists the first 20 in the log and ``_stats.json``;
it never stops on a bad pair and exits 1 only when nothing was written. :func:`write_shards`
writes whatever records it is given, unchecked (tests use it to plant bad records). The
output is deterministic: the same input gives the same bytes. Paths go through
``tf.io.gfile`` (``gs://`` works for inputs and outputs).
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import posixpath
import time
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

from absl import app, flags, logging
import tensorflow as tf

from contrastive_jax.data import image_ops

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
STATS_FILE = "_stats.json"
JPEG_QUALITY = 95
MAX_LISTED = 20  # skipped inputs listed by name in the log and _stats.json
_CHUNK = 256  # candidates validated concurrently (bounds memory; order is kept)

Text = Union[str, bytes]


def shard_path(output_dir: str, shard: int) -> str:
  """``{output_dir}/{shard:05d}.tfrecord``."""
  return posixpath.join(output_dir, f"{shard:05d}.tfrecord")


def _bytes(value: Text) -> bytes:
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def image_size(image_bytes: bytes) -> Tuple[int, int]:
  """``(width, height)`` of encoded image bytes (JPEG from the header, others decoded), or
  ``(0, 0)`` when they cannot be read. Never raises."""
  try:
    if int(image_ops.image_format(image_bytes)) == image_ops.FORMAT_JPEG:
      shape = tf.io.extract_jpeg_shape(image_bytes).numpy()
    else:
      shape = tf.shape(image_ops.decode_rgb(image_bytes)).numpy()
    return int(shape[1]), int(shape[0])
  except (tf.errors.OpError, ValueError):
    return 0, 0


def make_example(key: Text, image_bytes: bytes, caption, width: int, height: int,
                 image_key: str = "jpg") -> tf.train.Example:
  """One img2dataset-style record (``key``, ``jpg`` or ``png``, ``txt``, ``width``,
  ``height``). ``caption``: a string, or a tuple of several (``txt`` then holds them all:
  the readers treat them as the image's captions, e.g. for retrieval)."""
  def feature_bytes(value):
    values = [_bytes(v) for v in value] if isinstance(value, tuple) else [value]
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

  def feature_int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

  return tf.train.Example(features=tf.train.Features(feature={
      "key": feature_bytes(_bytes(key)), image_key: feature_bytes(bytes(image_bytes)),
      "txt": feature_bytes(caption if isinstance(caption, tuple) else _bytes(caption)),
      "width": feature_int(width),
      "height": feature_int(height)}))


def _existing_outputs(output_dir: str) -> List[str]:
  if not tf.io.gfile.isdir(output_dir):
    return []
  shards = tf.io.gfile.glob(posixpath.join(output_dir, "[0-9]*.tfrecord"))
  stats = posixpath.join(output_dir, STATS_FILE)
  return sorted(shards) + ([stats] if tf.io.gfile.exists(stats) else [])


def write_shards(records: Iterable[tuple], output_dir: str, *, examples_per_shard: int = 1000,
                 image_key: str = "jpg", overwrite: bool = False,
                 extra_stats: Optional[Dict[str, Any]] = None,
                 progress_every_s: float = 30.0) -> Dict[str, Any]:
  """Writes records, unchecked, to ``{output_dir}/{shard:05d}.tfrecord`` + ``_stats.json``.

  No validation happens here (the CLI validates before calling it): undecodable image bytes,
  empty captions or invalid UTF-8 (pass ``bytes``) are written as given, so tests can plant
  bad records.

  Args:
    records: iterable of ``(key, image_bytes, caption)`` or ``(key, image_bytes, caption,
      width, height)``; ``key`` and ``caption`` are ``str`` (written as UTF-8) or ``bytes``
      (written as is). Without width / height they are read with :func:`image_size`
      (``0`` when the bytes do not decode).
    output_dir: created if missing (any ``tf.io.gfile`` path).
    examples_per_shard: records per shard file (the last one may have fewer).
    image_key: feature name of the image bytes (``"jpg"``, img2dataset's; or ``"png"``).
    overwrite: delete existing shards and ``_stats.json`` first; otherwise their presence is
      an error (stale shards of a bigger earlier run would silently join the data set).
    extra_stats: merged into the stats after ``records`` is exhausted (the CLI's skip
      counts, filled in while its generator runs).
    progress_every_s: seconds between progress log lines.

  Returns:
    The stats written to ``_stats.json``: ``written``, ``shards``, ``shard_files``
    (basenames), ``examples_per_shard``, ``image_bytes``, ``image_key``, plus ``extra_stats``.

  Raises:
    FileExistsError: ``output_dir`` has shards or stats and ``overwrite`` is False.
    ValueError: ``examples_per_shard < 1``.
  """
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard={examples_per_shard}; need at least 1.")
  existing = _existing_outputs(output_dir)
  if existing and not overwrite:
    raise FileExistsError(f"{output_dir} already has {len(existing)} shard/stats file(s) "
                          f"({existing[0]}, ...); pass overwrite=True (--overwrite) to replace "
                          "them.")
  for path in existing:
    tf.io.gfile.remove(path)
  tf.io.gfile.makedirs(output_dir)
  written, image_bytes, shard_files, writer = 0, 0, [], None
  start = last_log = time.perf_counter()
  try:
    for record in records:
      if len(record) == 3:
        key, data, caption = record
        width, height = image_size(data)
      else:
        key, data, caption, width, height = record
      if written % examples_per_shard == 0:
        if writer is not None:
          writer.close()
        path = shard_path(output_dir, written // examples_per_shard)
        writer = tf.io.TFRecordWriter(path)
        shard_files.append(posixpath.basename(path))
      example = make_example(key, data, caption, width, height, image_key)
      writer.write(example.SerializeToString(deterministic=True))
      written += 1
      image_bytes += len(data)
      now = time.perf_counter()
      if now - last_log >= progress_every_s:
        last_log = now
        logging.info("%d records written (%.1f records/s), %d shard(s).", written,
                     written / (now - start), len(shard_files))
  finally:
    if writer is not None:
      writer.close()
  stats = {"written": written, "shards": len(shard_files), "shard_files": shard_files,
           "examples_per_shard": examples_per_shard, "image_bytes": image_bytes,
           "image_key": image_key, **(extra_stats or {})}
  with tf.io.gfile.GFile(posixpath.join(output_dir, STATS_FILE), "w") as f:
    f.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
  seconds = time.perf_counter() - start
  logging.info("Wrote %d records in %d shard(s) to %s in %.1f s (%.1f records/s).", written,
               len(shard_files), output_dir, seconds, written / max(seconds, 1e-9))
  return stats


# ---------------------------------------------------------------------------------------------
# Inputs and validation (the CLI side).


class Candidate(NamedTuple):
  """An input pair before validation; ``problem`` is a skip reason known without reading."""
  key: str
  path: str
  caption: Optional[Any]  # a string, or a tuple of strings (grouped rows of one image)
  problem: Optional[str] = None


class SkipLog:
  """Counts skipped inputs per reason and keeps the first :data:`MAX_LISTED`."""

  def __init__(self):
    self.counts: Dict[str, int] = {}
    self.listed: List[Dict[str, str]] = []

  def add(self, reason: str, candidate: Candidate, detail: str = "") -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if len(self.listed) < MAX_LISTED:
      entry = {"reason": reason, "key": candidate.key, "path": candidate.path}
      if detail:
        entry["detail"] = detail[:300]
      self.listed.append(entry)
      logging.warning("Skipping %s (%s): %s%s", candidate.key, candidate.path, reason,
                      f" ({detail[:300]})" if detail else "")

  def as_stats(self) -> Dict[str, Any]:
    return {"skipped": dict(sorted(self.counts.items())),
            "skipped_total": sum(self.counts.values()), "skipped_examples": self.listed}


def _is_absolute(path: str) -> bool:
  return posixpath.isabs(path) or "://" in path


def table_candidates(path: str, *, image_column: str = "filepath",
                     caption_column: str = "title", separator: Optional[str] = None,
                     key_column: Optional[str] = None) -> Iterator[Candidate]:
  """The pairs of a CSV/TSV file with a header row (open_clip's convention).

  Raises:
    ValueError: a named column is not in the header (lists the header).
  """
  if separator is None:
    separator = "\t" if path.lower().endswith(".tsv") else ","
  base = posixpath.dirname(path)
  with tf.io.gfile.GFile(path, "r") as f:
    reader = csv.reader(f, delimiter=separator)
    header = next(reader, None) or []
    if header:
      header[0] = header[0].lstrip("\ufeff")
    wanted = [image_column, caption_column] + ([key_column] if key_column else [])
    missing = [c for c in wanted if c not in header]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing} in the header {header} (separator "
                       f"{separator!r}); set --image_column / --caption_column / --separator.")
    cols = {name: header.index(name) for name in wanted}
    for row_number, row in enumerate(reader):
      if not row:
        continue
      cell = lambda name: row[cols[name]] if cols[name] < len(row) else ""  # noqa: E731
      key = cell(key_column) if key_column else f"{row_number:09d}"
      image = cell(image_column).strip()
      if image and not _is_absolute(image):
        image = posixpath.join(base, image)
      yield Candidate(key, image, cell(caption_column), None if image else "missing_path")


def group_captions(candidates: Iterable[Candidate]) -> Iterator[Candidate]:
  """Merges consecutive candidates of the same image path into one with a tuple of their
  captions (a CSV with one row per caption, e.g. COCO / Flickr30k evaluation splits)."""
  group: List[Candidate] = []

  def merged():
    first = group[0]
    return first._replace(caption=tuple(c.caption or "" for c in group))

  for candidate in candidates:
    if group and (candidate.problem or candidate.path != group[0].path):
      yield merged()
      group = []
    if candidate.problem:
      yield candidate
      continue
    group.append(candidate)
  if group:
    yield merged()


def folder_candidates(root: str) -> Iterator[Candidate]:
  """Every image under ``root`` (sorted, recursive) with its same-stem ``.txt`` caption."""
  for directory, _, files in sorted(tf.io.gfile.walk(root)):
    names = set(files)
    for name in sorted(files):
      stem, ext = posixpath.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      image = posixpath.join(directory, name)
      key = posixpath.relpath(posixpath.join(directory, stem), root)
      if stem + ".txt" not in names:
        yield Candidate(key, image, None, "no_caption_file")
        continue
      try:
        with tf.io.gfile.GFile(posixpath.join(directory, stem + ".txt"), "rb") as f:
          caption = f.read().decode("utf-8", errors="replace")
      except (tf.errors.OpError, OSError):
        yield Candidate(key, image, None, "unreadable_caption")
        continue
      yield Candidate(key, image, caption)


def _encode(image: tf.Tensor, image_format: str) -> bytes:
  if image_format == "png":
    return tf.io.encode_png(image).numpy()
  return tf.io.encode_jpeg(image, quality=JPEG_QUALITY).numpy()


def load_pair(candidate: Candidate, *, resize: Optional[int] = None,
              image_format: str = "jpg") -> Tuple[Optional[tuple], Optional[str], str]:
  """Validates one pair and prepares its stored image.

  Returns:
    ``(record, None, "")`` with ``record = (key, image_bytes, caption, width, height)``, or
    ``(None, reason, detail)`` with reason ``missing_path``, ``no_caption_file``,
    ``unreadable_caption``, ``empty_caption``, ``missing_file``, ``unreadable``,
    ``unknown_format`` or ``undecodable``.
  """
  if candidate.problem:
    return None, candidate.problem, ""
  if isinstance(candidate.caption, tuple):  # several captions: keep the non-blank ones
    caption = tuple(c.strip() for c in candidate.caption if c and c.strip())
  else:
    caption = (candidate.caption or "").strip()
  if not caption:
    return None, "empty_caption", ""
  try:
    with tf.io.gfile.GFile(candidate.path, "rb") as f:
      data = f.read()
  except tf.errors.NotFoundError:
    return None, "missing_file", ""
  except (tf.errors.OpError, OSError) as e:
    return None, "unreadable", str(e)
  fmt = int(image_ops.image_format(data))
  if fmt == image_ops.FORMAT_UNKNOWN:
    return None, "unknown_format", f"first bytes {data[:8]!r}"
  try:
    image = image_ops.decode_rgb(data)
  except tf.errors.OpError as e:
    return None, "undecodable", e.message
  height, width = (int(s) for s in image.shape[:2])
  if height == 0 or width == 0:
    return None, "undecodable", "empty image"
  keep = {"jpg": image_ops.FORMAT_JPEG, "png": image_ops.FORMAT_PNG}[image_format]
  if resize and min(height, width) > resize:
    scale = resize / min(height, width)
    height, width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = tf.image.resize(tf.cast(image, tf.float32), [height, width], "bicubic",
                              antialias=True)
    image = tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)
    data = _encode(image, image_format)
  elif fmt != keep:
    data = _encode(image, image_format)
  return (candidate.key, data, caption, width, height), None, ""


def validated_records(candidates: Iterable[Candidate], skips: SkipLog, *,
                      resize: Optional[int] = None, image_format: str = "jpg",
                      workers: int = 1) -> Iterator[tuple]:
  """The records of the pairs that pass :func:`load_pair`, in input order; the others go to
  ``skips``. ``workers`` threads decode concurrently (TF ops release the GIL)."""
  def load(candidate):
    return load_pair(candidate, resize=resize, image_format=image_format)

  def chunks():
    chunk = []
    for candidate in candidates:
      chunk.append(candidate)
      if len(chunk) == _CHUNK:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for chunk in chunks():
      for candidate, (record, reason, detail) in zip(chunk, pool.map(load, chunk)):
        if record is None:
          skips.add(reason, candidate, detail)
        else:
          yield record


def convert(input_path: str, output_dir: str, *, image_column: str = "filepath",
            caption_column: str = "title", separator: Optional[str] = None,
            key_column: Optional[str] = None, examples_per_shard: int = 1000,
            resize: Optional[int] = None, image_format: str = "jpg", overwrite: bool = False,
            workers: int = 1, group: bool = False) -> Dict[str, Any]:
  """The CLI without flags: candidates -> validation -> :func:`write_shards`; returns the
  stats (also in ``_stats.json``: ``written``, ``skipped`` per reason, ``skipped_examples``,
  ``shards``, ...)."""
  if tf.io.gfile.isdir(input_path):
    candidates = folder_candidates(input_path)
  elif tf.io.gfile.exists(input_path):
    candidates = table_candidates(input_path, image_column=image_column,
                                  caption_column=caption_column, separator=separator,
                                  key_column=key_column)
  else:
    raise FileNotFoundError(f"--input {input_path} is neither a directory nor a file.")
  if group:
    candidates = group_captions(candidates)
  skips = SkipLog()
  extra = {"input": input_path}
  records = validated_records(candidates, skips, resize=resize, image_format=image_format,
                              workers=workers)

  def records_then_stats():
    yield from records
    extra.update(skips.as_stats())

  stats = write_shards(records_then_stats(), output_dir, examples_per_shard=examples_per_shard,
                       image_key=image_format, overwrite=overwrite, extra_stats=extra)
  if skips.counts:
    logging.warning("Skipped %d input(s): %s", sum(skips.counts.values()), skips.counts)
  return stats


def main():
  """The CLI (flags are defined here, not at import, so importing the module is side-effect
  free)."""
  flags.DEFINE_string("input", None, "CSV/TSV file of image paths and captions, or a folder "
                      "of images with same-stem .txt captions.")
  flags.DEFINE_string("output_dir", None, "Where {shard:05d}.tfrecord and _stats.json go.")
  flags.DEFINE_string("image_column", "filepath", "CSV/TSV column of image paths.")
  flags.DEFINE_string("caption_column", "title", "CSV/TSV column of captions.")
  flags.DEFINE_string("key_column", None, "CSV/TSV column of keys (default: the row number).")
  flags.DEFINE_string("separator", None, "CSV/TSV field separator (default: tab for .tsv, "
                      "else comma).")
  flags.DEFINE_integer("examples_per_shard", 1000, "Records per shard.")
  flags.DEFINE_integer("resize", None, "Shrink images whose shorter side is larger to this.")
  flags.DEFINE_enum("image_format", "jpg", ["jpg", "png"], "Stored format and feature name.")
  flags.DEFINE_bool("overwrite", False, "Replace existing shards in --output_dir.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Threads decoding / re-encoding.")
  flags.DEFINE_bool("group_captions", False, "Consecutive rows of the same image become one "
                    "record with all their captions (retrieval evaluation sets).")
  flags.mark_flags_as_required(["input", "output_dir"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    tf.config.set_visible_devices([], "GPU")
    f = flags.FLAGS
    try:
      stats = convert(f.input, f.output_dir, image_column=f.image_column,
                      caption_column=f.caption_column, separator=f.separator,
                      key_column=f.key_column, examples_per_shard=f.examples_per_shard,
                      resize=f.resize, image_format=f.image_format, overwrite=f.overwrite,
                      workers=f.workers, group=f.group_captions)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      logging.error("%s", e)
      return 2
    if not stats["written"]:
      logging.error("Nothing was written (skipped: %s).", stats.get("skipped"))
      return 1
    return 0

  app.run(run)


if __name__ == "__main__":
  main()

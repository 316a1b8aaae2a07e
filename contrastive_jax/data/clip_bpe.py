"""OpenAI CLIP byte-level BPE tokenizer, usable inside tf.data.

Reproduces the token ids of OpenAI CLIP / open_clip (``SimpleTokenizer`` with its default
``clean='lower'``) from the standard ``bpe_simple_vocab_16e6.txt.gz`` file:

1. cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace, lowercase;
2. pre-tokenisation with CLIP's regular expression (contractions, letter runs, single digits,
   runs of other non-space characters; the two special-token strings match as themselves);
3. each piece's UTF-8 bytes mapped to printable characters (GPT-2 byte-to-unicode table), the
   last one marked with ``</w>``, then merged greedily by BPE merge rank;
4. ``[<start_of_text>] + ids + [<end_of_text>]``, truncated to ``context_length`` with the EOT
   written over the last slot (open_clip behaviour), padded with 0.

Note that id 0 is also the real token ``!``: use the mask, not ``tokens != pad_id``.

The BPE runs in Python (with a word cache) through one ``tf.numpy_function`` per ``tokenize``
call, vectorised over all strings of the call, so it works on symbolic tensors in tf.data maps.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf

SOT = "<start_of_text>"
EOT = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2
_WORD_END = "</w>"
# CLIP's pre-tokeniser (after the special tokens): contractions, letter runs, one digit at a
# time, runs of anything that is neither space, letter nor digit. Needs `regex` for \p{..}.
_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CACHE_LIMIT = 200_000


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> Dict[int, str]:
  """The reversible byte -> printable character table of GPT-2 / CLIP, in vocabulary order.

  Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and
  come first (ascending); the other 68 bytes follow (ascending) as ``chr(256 + k)``. The
  insertion order is the order of the first 256 vocabulary entries.
  """
  keep = list(range(ord("!"), ord("~") + 1))
  keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  table = {b: chr(b) for b in keep}
  rest = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + k) for k, b in enumerate(rest)})
  return table


def clean_text(text: str) -> str:
  """CLIP text cleaning: ftfy, double HTML unescape, whitespace collapse, lowercase."""
  import ftfy  # pylint: disable=import-outside-toplevel

  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


def _merge_once(word: Tuple[str, ...], first: str, second: str) -> Tuple[str, ...]:
  """Replaces every non-overlapping ``(first, second)`` pair, scanning left to right."""
  out, i, n = [], 0, len(word)
  while i < n:
    if i + 1 < n and word[i] == first and word[i + 1] == second:
      out.append(first + second)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


class ClipBpeTokenizer:
  """CLIP BPE: ``vocab_size=49408``, SOT 49406 first, EOT 49407 last, ``pad_id=0``.

  Args:
    vocab_path: path of ``bpe_simple_vocab_16e6.txt.gz`` (gzip text: a header line, then one
      ``"a b"`` merge per line). Nothing is downloaded.
    context_length: ``L``, the token length of every output row (CLIP uses 77).
  """

  pad_id = 0

  def __init__(self, vocab_path: str, context_length: int = 77):
    import regex  # pylint: disable=import-outside-toplevel

    if context_length < 2:
      raise ValueError(f"context_length={context_length}; need at least 2 (SOT + EOT).")
    vocab_path = os.fspath(vocab_path)
    if not tf.io.gfile.exists(vocab_path):
      raise FileNotFoundError(
          f"CLIP BPE vocabulary not found at {vocab_path!r}; pass the path of "
          "bpe_simple_vocab_16e6.txt.gz (shipped with open_clip / OpenAI CLIP).")
    with tf.io.gfile.GFile(vocab_path, "rb") as f:
      lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{vocab_path!r} does not look like a CLIP BPE merges file.")
    chars = list(byte_to_unicode().values())
    vocab = chars + [c + _WORD_END for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    self.context_length = context_length
    self.vocab_size = len(vocab)
    self._decoder: List[str] = vocab
    self._encoder = {piece: i for i, piece in enumerate(vocab)}
    self._ranks = {m: r for r, m in enumerate(merges)}
    self.sot_id = self._encoder[SOT]
    self.eot_id = self._encoder[EOT]
    self._byte_enc = byte_to_unicode()
    self._byte_dec = {c: b for b, c in self._byte_enc.items()}
    self._pattern = regex.compile(f"{regex.escape(SOT)}|{regex.escape(EOT)}|{_PIECES}",
                                  regex.IGNORECASE)
    self._cache: Dict[str, Tuple[int, ...]] = {}

  # ------------------------------------------------------------------ pure Python side
  def _bpe_ids(self, piece: str) -> Tuple[int, ...]:
    """Ids of one byte-encoded pre-token (cached)."""
    hit = self._cache.get(piece)
    if hit is not None:
      return hit
    if piece in (SOT, EOT):
      ids = (self._encoder[piece],)
    else:
      word = tuple(piece[:-1]) + (piece[-1] + _WORD_END,)
      while len(word) > 1:
        best, best_rank = None, None
        for pair in zip(word[:-1], word[1:]):
          rank = self._ranks.get(pair)
          if rank is not None and (best_rank is None or rank < best_rank):
            best, best_rank = pair, rank
        if best is None:
          break
        word = _merge_once(word, *best)
      ids = tuple(self._encoder[w] for w in word)
    if len(self._cache) >= _CACHE_LIMIT:
      self._cache.clear()
    self._cache[piece] = ids
    return ids

  def encode(self, text: str) -> List[int]:
    """Text -> BPE ids without SOT / EOT and without truncation."""
    ids: List[int] = []
    for piece in self._pattern.findall(clean_text(text)):
      ids.extend(self._bpe_ids("".join(self._byte_enc[b] for b in piece.encode("utf-8"))))
    return ids

  def tokenize_numpy(self, texts: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """Python strings / UTF-8 bytes ``[N]`` -> ``(int32 tokens [N, L], bool mask [N, L])``."""
    n, length = len(texts), self.context_length
    tokens = np.full((n, length), self.pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    for row, text in enumerate(texts):
      if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
      ids = [self.sot_id] + self.encode(text)[: length - 2] + [self.eot_id]
      tokens[row, : len(ids)] = ids
      mask[row, : len(ids)] = True
    return tokens, mask

  # ------------------------------------------------------------------ TF side
  def tokenize(self, texts) -> Tuple[tf.Tensor, tf.Tensor]:
    """``tf.string [...]`` -> ``(int32 tokens [..., L], bool mask [..., L])``.

    Works eagerly and on symbolic tensors (tf.data maps); mask is True on SOT..EOT.
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    shape = tf.shape(texts)
    flat = tf.reshape(texts, [-1])
    tokens, mask = tf.numpy_function(
        lambda x: self.tokenize_numpy(x.tolist()), [flat], [tf.int32, tf.bool], stateful=False,
        name="clip_bpe_tokenize")
    tokens.set_shape([None, self.context_length])
    mask.set_shape([None, self.context_length])
    out_shape = tf.concat([shape, [self.context_length]], axis=0)
    out_static = texts.shape.concatenate([self.context_length])
    tokens, mask = tf.reshape(tokens, out_shape), tf.reshape(mask, out_shape)
    tokens.set_shape(out_static)
    mask.set_shape(out_static)
    return tokens, mask

  def decode(self, ids: Sequence[int]) -> str:
    """BPE ids (no SOT / EOT / padding) -> text (lowercased, cleaned, as CLIP sees it)."""
    raw = bytearray()
    for i in ids:
      piece = self._decoder[int(i)]
      if piece in (SOT, EOT):
        continue
      word_end = piece.endswith(_WORD_END)
      if word_end:
        piece = piece[: -len(_WORD_END)]
      raw.extend(self._byte_dec[c] for c in piece)
      if word_end:
        raw.append(ord(" "))
    return raw.decode("utf-8", errors="replace").strip()

  def detokenize(self, tokens) -> List[str]:
    """Inverse for inspection: int tokens ``[..., L]`` -> list of strings (flattened rows).

    Reads each row between SOT and the first EOT (padding 0 is also the ``!`` token, so the
    row layout, not the id, tells padding apart).
    """
    rows = np.asarray(tokens).reshape(-1, self.context_length)
    out = []
    for row in rows:
      row = [int(t) for t in row]
      start = 1 if row and row[0] == self.sot_id else 0
      stop = row.index(self.eot_id) if self.eot_id in row else len(row)
      out.append(self.decode(row[start:stop]))
    return out

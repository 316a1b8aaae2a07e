"""SentencePiece tokenizer that runs in-graph (big_vision / SigLIP convention).

The ids come from ``tensorflow_text.SentencepieceTokenizer`` (a TF op, so no Python runs per
example inside tf.data); the model's metadata (EOS / pad ids, vocabulary size) is read once
with the ``sentencepiece`` Python package. ``tensorflow-text`` must match the installed
TensorFlow and is installed with ``pip install --no-deps`` (see ``.ci/run``) so that it does not
pull the full ``tensorflow`` wheel next to ``tensorflow-cpu``.

Layout (``eos="sticky"``, the default): ``ids[:L-1] + [eos]`` then ``pad_id`` up to ``L``, so
every row ends with ``eot_id`` even when truncated, as the Tokenizer protocol requires.
``eos="yes"``: ``(ids + [eos])[:L]`` (big_vision's plain ``eos="yes"``): a truncated row then
ends with a text token, not EOS; the mask still marks exactly the kept tokens.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

EOS_MODES = ("sticky", "yes")


class SentencePieceTokenizer:
  """In-graph SentencePiece: ``tokenize(tf.string [...]) -> (int32 [..., L], bool [..., L])``.

  Args:
    model_path: a serialized SentencePiece ``.model`` file (any path ``tf.io.gfile`` reads).
    context_length: ``L``, the length of every output row (SigLIP uses 16 or 64).
    eos: ``"sticky"`` (truncate the text to ``L-1`` ids, then EOS: EOS is always kept) or
      ``"yes"`` (append EOS, then truncate to ``L``: long texts lose their EOS). The model must
      define an EOS id. ``"none"`` is not supported: the protocol needs a final ``eot_id``.
    pad_id: id written where ``mask`` is False; ``None`` = the model's pad id if it has one
      (``>= 0``), else 0. SigLIP's models use ``pad_id=1``.

  Attributes:
    vocab_size, eot_id (the model's EOS id), pad_id, context_length.
  """

  def __init__(self, model_path: str, context_length: int = 16, eos: str = "sticky",
               pad_id: Optional[int] = None):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel
      import tensorflow_text  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
          "SentencePieceTokenizer needs `sentencepiece` and `tensorflow-text` (install the "
          "latter with `pip install --no-deps tensorflow-text==<your TF version>`).") from e
    if eos not in EOS_MODES:
      raise ValueError(f"eos={eos!r}; supported: {EOS_MODES} (the last real token must be "
                       "the EOS/eot_id, so 'none' is not available).")
    if context_length < 2:
      raise ValueError(f"context_length={context_length}; need at least 2 (text + EOS).")
    model_path = os.fspath(model_path)
    if not tf.io.gfile.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model not found at {model_path!r}.")
    with tf.io.gfile.GFile(model_path, "rb") as f:
      proto = f.read()
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    if processor.eos_id() < 0:
      raise ValueError(f"SentencePiece model {model_path!r} has no EOS piece (eos_id=-1); "
                       "retrain it with an eos_id >= 0.")
    self.context_length = context_length
    self.eos = eos
    self.vocab_size = int(processor.vocab_size())
    self.eot_id = int(processor.eos_id())
    self.pad_id = int(pad_id if pad_id is not None else max(processor.pad_id(), 0))
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad_id={self.pad_id} outside the vocabulary [0, {self.vocab_size}).")
    self._processor = processor
    self._tf_tokenizer = tensorflow_text.SentencepieceTokenizer(
        model=proto, out_type=tf.int32, add_bos=False, add_eos=False)

  def tokenize(self, texts) -> Tuple[tf.Tensor, tf.Tensor]:
    """``tf.string [...]`` -> ``(int32 tokens [..., L], bool mask [..., L])`` with TF ops only.

    Works eagerly and on symbolic tensors (tf.data maps), for any input rank (scalar too).
    """
    length = self.context_length
    texts = tf.convert_to_tensor(texts, tf.string)
    shape = tf.shape(texts)
    ids = self._tf_tokenizer.tokenize(tf.reshape(texts, [-1]))  # int32 ragged [N, (len)]
    eos = tf.RaggedTensor.from_tensor(tf.fill([ids.nrows(), 1], tf.constant(self.eot_id)))
    if self.eos == "sticky":
      ids = tf.concat([ids[:, : length - 1], eos], axis=1)
    else:
      ids = tf.concat([ids, eos], axis=1)[:, :length]
    tokens = ids.to_tensor(default_value=self.pad_id, shape=[None, length])
    mask = tf.sequence_mask(ids.row_lengths(), length)
    out_shape = tf.concat([shape, [length]], axis=0)
    out_static = texts.shape.concatenate([length])
    tokens = tf.reshape(tf.cast(tokens, tf.int32), out_shape)
    mask = tf.reshape(mask, out_shape)
    tokens.set_shape(out_static)
    mask.set_shape(out_static)
    return tokens, mask

  def encode(self, text: str) -> List[int]:
    """Reference ids of one text from the Python ``sentencepiece`` package (no EOS/padding)."""
    return list(self._processor.encode(text))

  def detokenize(self, tokens, mask=None) -> List[str]:
    """Inverse for inspection: ints ``[..., L]`` (+ optional mask) -> list of strings.

    Without a mask a row is read up to its first EOS (padding may share an id with a real
    piece, e.g. ``pad_id=1`` for SigLIP, so the mask is the exact way).
    """
    rows = np.asarray(tokens).reshape(-1, self.context_length)
    masks = None if mask is None else np.asarray(mask).reshape(rows.shape)
    out = []
    for r, row in enumerate(rows):
      row = [int(t) for t in (row if masks is None else row[masks[r]])]
      if self.eot_id in row:
        row = row[: row.index(self.eot_id)]
      out.append(self._processor.decode(row))
    return out

"""Text tokenizers that run inside tf.data.

Interface (what every tokenizer implements, so SentencePiece and CLIP BPE can slot in):

* ``context_length`` / ``vocab_size`` / ``pad_id`` / ``eot_id`` attributes;
* ``tokenize(texts)``: a ``tf.string`` tensor of any shape ``[...]`` -> ``(tokens, mask)``
  with int32 ``tokens [..., context_length]`` and bool ``mask [..., context_length]``. Real
  tokens come first and end with ``eot_id`` (truncated texts keep their EOT), followed by
  ``pad_id`` padding where ``mask`` is False. Must work on symbolic tensors (tf.data maps).

Registered (``config.tokenizer = dict(name=..., **kwargs)``): ``bytes`` (below, TF ops only),
``clip_bpe`` (:mod:`clip_bpe`, OpenAI CLIP BPE via one ``tf.numpy_function`` per call) and
``sentencepiece`` (:mod:`spm_tokenizer`, in-graph via ``tensorflow_text``).
"""

from __future__ import annotations

from typing import Protocol, Tuple

import tensorflow as tf

from contrastive_jax.data.clip_bpe import ClipBpeTokenizer
from contrastive_jax.data.spm_tokenizer import SentencePieceTokenizer


class Tokenizer(Protocol):
  context_length: int
  vocab_size: int
  pad_id: int
  eot_id: int

  def tokenize(self, texts: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    ...


def pad_with_eot(ids: tf.RaggedTensor, context_length: int, eot_id: int, pad_id: int):
  """Ragged ids ``[N, (len)]`` -> truncated + EOT + padded ``(tokens [N, L], mask [N, L])``."""
  ids = ids[:, : context_length - 1]
  eot = tf.fill([ids.nrows(), 1], tf.constant(eot_id, ids.dtype))
  ids = tf.concat([ids, tf.RaggedTensor.from_tensor(eot)], axis=1)
  tokens = ids.to_tensor(default_value=pad_id, shape=[None, context_length])
  mask = tf.sequence_mask(ids.row_lengths(), context_length)
  return tf.cast(tokens, tf.int32), mask


class ByteTokenizer:
  """UTF-8 bytes as tokens: no vocabulary file. ``pad=0``, byte ``v`` -> ``v + 1``, EOT=257."""

  pad_id = 0
  eot_id = 257
  vocab_size = 258

  def __init__(self, context_length: int = 64):
    if context_length < 2:
      raise ValueError(f"context_length={context_length}; need at least 2 (text + EOT).")
    self.context_length = context_length

  def tokenize(self, texts):
    texts = tf.convert_to_tensor(texts, tf.string)
    shape = tf.shape(texts)
    flat = tf.reshape(texts, [-1])
    chars = tf.strings.bytes_split(flat)
    byte_values = tf.io.decode_raw(chars.flat_values, tf.uint8)[:, 0]
    ids = chars.with_flat_values(tf.cast(byte_values, tf.int32) + 1)
    tokens, mask = pad_with_eot(ids, self.context_length, self.eot_id, self.pad_id)
    out_shape = tf.concat([shape, [self.context_length]], axis=0)
    return tf.reshape(tokens, out_shape), tf.reshape(mask, out_shape)

  def detokenize(self, tokens) -> list:
    """Inverse for inspection (numpy/TF ints ``[N, L]`` -> list of Python strings)."""
    out = []
    for row in tf.convert_to_tensor(tokens).numpy().reshape(-1, self.context_length):
      row = [int(t) - 1 for t in row if 0 < t < self.eot_id]
      out.append(bytes(row).decode("utf-8", errors="replace"))
    return out


TOKENIZERS = {
    "bytes": ByteTokenizer,
    "clip_bpe": ClipBpeTokenizer,
    "sentencepiece": SentencePieceTokenizer,
}


def make_tokenizer(name: str, **kwargs) -> Tokenizer:
  if name not in TOKENIZERS:
    raise ValueError(f"config.tokenizer.name={name!r}; known tokenizers: {sorted(TOKENIZERS)}.")
  return TOKENIZERS[name](**kwargs)

"""Byte tokenizer: round trip, EOT placement, truncation, masks, batch shapes."""

import numpy as np
import pytest

from contrastive_jax.data import tokenizers


def test_round_trip_and_layout():
  tok = tokenizers.ByteTokenizer(context_length=12)
  tokens, mask = tok.tokenize(["a red circle", "hi", ""])
  tokens, mask = tokens.numpy(), mask.numpy()
  assert tokens.shape == mask.shape == (3, 12) and tokens.dtype == np.int32
  # "a red circle" is 12 bytes: truncated to 11 + EOT.
  assert tok.detokenize(tokens) == ["a red circl", "hi", ""]
  np.testing.assert_array_equal(tokens[1, :3], [ord("h") + 1, ord("i") + 1, tok.eot_id])
  np.testing.assert_array_equal(mask.sum(1), [12, 3, 1])
  assert (tokens[~mask] == tok.pad_id).all()
  # The last valid token of every row is EOT.
  assert (tokens[np.arange(3), mask.sum(1) - 1] == tok.eot_id).all()


def test_utf8_bytes_and_any_input_shape():
  tok = tokenizers.ByteTokenizer(context_length=8)
  tokens, mask = tok.tokenize([["é", "a"], ["b", "c"]])
  assert tokens.shape == (2, 2, 8)
  np.testing.assert_array_equal(tokens.numpy()[0, 0, :3], [0xC3 + 1, 0xA9 + 1, tok.eot_id])
  scalar, _ = tok.tokenize("x")
  assert scalar.shape == (8,)


def test_unknown_tokenizer_and_bad_context():
  with pytest.raises(ValueError, match="bogus"):
    tokenizers.make_tokenizer("bogus")
  with pytest.raises(ValueError, match="context_length"):
    tokenizers.ByteTokenizer(context_length=1)

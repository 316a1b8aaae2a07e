"""CLIP BPE tokenizer: exact ids vs open_clip's reference, layout, shapes, tf.data graph mode."""

import json
import pathlib
import unicodedata

import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import clip_bpe, tokenizers

DATA = pathlib.Path(__file__).parent / "data"
VOCAB = DATA / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def reference():
  with open(DATA / "clip_bpe_reference.json", encoding="utf-8") as f:
    return json.load(f)["cases"]


@pytest.fixture(scope="module")
def tok77():
  return clip_bpe.ClipBpeTokenizer(str(VOCAB))


@pytest.fixture(scope="module")
def tok16():
  return clip_bpe.ClipBpeTokenizer(VOCAB, context_length=16)


def test_reference_covers_the_hard_cases(reference):
  texts = [c["text"] for c in reference]
  assert len(texts) >= 40 and "" in texts
  assert any(unicodedata.normalize("NFC", t) != t for t in texts)  # NFD accents
  assert any("&amp;" in t for t in texts) and any("Ã" in t for t in texts)  # HTML, mojibake
  assert sum(c["ids_77"][-1] == EOT for c in reference) >= 3  # truncated at 77


def test_ids_match_open_clip_exactly(reference, tok77, tok16):
  texts = [c["text"] for c in reference]
  for tok, key in ((tok77, "ids_77"), (tok16, "ids_16")):
    tokens, _ = tok.tokenize(texts)
    got = tokens.numpy()
    for row, case in zip(got, reference):
      assert row.tolist() == case[key], (key, case["text"])


def test_layout_mask_and_truncation(reference, tok77):
  texts = [c["text"] for c in reference]
  tokens, mask = tok77.tokenize(texts)
  tokens, mask = tokens.numpy(), mask.numpy()
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (len(texts), 77)
  n = mask.sum(1)
  # Mask is a prefix: True exactly on SOT..EOT.
  np.testing.assert_array_equal(mask, np.arange(77)[None] < n[:, None])
  assert (tokens[:, 0] == SOT).all()
  assert (tokens[np.arange(len(texts)), n - 1] == EOT).all()
  assert (tokens[~mask] == tok77.pad_id).all()
  lens = [2 + len(tok77.encode(t)) for t in texts]
  np.testing.assert_array_equal(n, np.minimum(lens, 77))
  a75, a76 = " ".join(["a"] * 75), " ".join(["a"] * 76)
  fit, cut = tok77.tokenize([a75, a76])[0].numpy()
  assert fit.tolist() == [SOT] + [320] * 75 + [EOT]  # 77 tokens: no truncation
  assert cut.tolist() == fit.tolist()  # 78 tokens: text cut, EOT kept at L-1


def test_empty_and_whitespace_give_sot_eot(tok16):
  tokens, mask = tok16.tokenize(["", "  \t\n "])
  for row, m in zip(tokens.numpy(), mask.numpy()):
    assert row[:2].tolist() == [SOT, EOT] and m.sum() == 2 and (row[2:] == 0).all()


def test_batch_shapes_and_scalar(tok16):
  texts = [["a photo of a cat", "", "café"], ["東京", "😀 dog", "fish &amp; chips"]]
  tokens, mask = tok16.tokenize(texts)
  assert tokens.shape == mask.shape == (2, 3, 16)
  flat, flat_mask = tok16.tokenize(sum(texts, []))
  np.testing.assert_array_equal(tokens.numpy().reshape(6, 16), flat.numpy())
  np.testing.assert_array_equal(mask.numpy().reshape(6, 16), flat_mask.numpy())
  scalar, scalar_mask = tok16.tokenize("café")
  assert scalar.shape == scalar_mask.shape == (16,)
  np.testing.assert_array_equal(scalar.numpy(), flat.numpy()[2])


def test_inside_tf_data_map(tok16):
  texts = ["a photo of a cat", "A Photo Of A DOG.", "", "naïve café", "东京的夜景"]
  eager = tok16.tokenize(texts)[0].numpy()
  batched = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(tok16.tokenize)
  assert batched.element_spec[0].shape.as_list() == [None, 16]
  np.testing.assert_array_equal(np.concatenate([t for t, _ in batched.as_numpy_iterator()]),
                                eager)
  single = tf.data.Dataset.from_tensor_slices(texts).map(lambda s: {"text": tok16.tokenize(s)})
  assert single.element_spec["text"][0].shape.as_list() == [16]
  np.testing.assert_array_equal(np.stack([e["text"][0] for e in single.as_numpy_iterator()]),
                                eager)

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string)])
  def traced(x):
    return tok16.tokenize(x)

  out = traced(tf.constant([texts[:2], texts[2:4]]))[0]
  np.testing.assert_array_equal(out.numpy().reshape(4, 16), eager[:4])


def test_detokenize_round_trip(tok77):
  texts = ["a photo of a cat", "A Large  RED circle", "Café crème brûlée", "东京 😀", ""]
  tokens, _ = tok77.tokenize(texts)
  assert tok77.detokenize(tokens.numpy()) == [clip_bpe.clean_text(t) for t in texts]
  # "!" has id 0 = pad id: the row layout, not the id, delimits the text.
  assert tok77.detokenize(tok77.tokenize(["wow !!"])[0]) == ["wow !!"]


def test_byte_table_is_a_printable_bijection():
  table = clip_bpe.byte_to_unicode()
  assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
  assert all(c.isprintable() and not c.isspace() for c in table.values())
  assert list(table.values())[0] == "!" and table[ord(" ")] == chr(256 + 32)


def test_registry_attributes_and_errors(tmp_path):
  tok = tokenizers.make_tokenizer("clip_bpe", vocab_path=str(VOCAB), context_length=8)
  assert isinstance(tok, clip_bpe.ClipBpeTokenizer)
  assert (tok.vocab_size, tok.eot_id, tok.pad_id, tok.context_length) == (49408, EOT, 0, 8)
  missing = tmp_path / "nope.txt.gz"
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    clip_bpe.ClipBpeTokenizer(str(missing))
  with pytest.raises(ValueError, match="context_length"):
    clip_bpe.ClipBpeTokenizer(str(VOCAB), context_length=1)

"""In-graph SentencePiece tokenizer vs the Python ``sentencepiece`` package; layout and tf.data."""

import io
import random
import unicodedata

import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

from contrastive_jax.data import spm_tokenizer, tokenizers

WORDS = ("a the photo of red blue green cat dog circle square small large café crème naïve Zoë "
         "über 東京 夜景 😀 🐱 on in with and near").split()
TEXTS = [
    "a red cat", "", "   ", "café crème naïve",
    unicodedata.normalize("NFD", "café crème naïve"),
    "😀 🐱 東京 夜景", "xyz unknown QQ ünseen ß", "  leading and   inner spaces ",
    "a the photo of red blue green cat dog circle square small large with and near",
    " ".join(WORDS * 3),
]


def _train(path, **kwargs):
  rng = random.Random(0)
  sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
               for _ in range(300)]
  buf = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, hard_vocab_limit=False,
      character_coverage=1.0, minloglevel=2, **kwargs)
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
  """Tiny models: default ids (no pad piece, byte fallback) and T5-like explicit ids."""
  root = tmp_path_factory.mktemp("spm")
  return {
      # unk=0, bos=1, eos=2, no pad piece; 256 byte pieces so nothing is unknown.
      "default": _train(root / "default.model", vocab_size=300, byte_fallback=True),
      # unk=0, eos=1, pad=2, no bos; unseen characters map to unk.
      "explicit": _train(root / "explicit.model", vocab_size=80, unk_id=0, eos_id=1, pad_id=2,
                         bos_id=-1),
      "no_eos": _train(root / "no_eos.model", vocab_size=80, eos_id=-1),
  }


def _expected(tok, text, eos):
  ids = list(tok.encode(text))
  ids = ids[: tok.context_length - 1] + [tok.eot_id] if eos == "sticky" else (
      ids + [tok.eot_id])[: tok.context_length]
  row = ids + [tok.pad_id] * (tok.context_length - len(ids))
  return row, len(ids)


@pytest.mark.parametrize("name", ["default", "explicit"])
@pytest.mark.parametrize("eos", ["sticky", "yes"])
@pytest.mark.parametrize("length", [4, 16])
def test_ids_match_python_sentencepiece(models, name, eos, length):
  tok = spm_tokenizer.SentencePieceTokenizer(models[name], context_length=length, eos=eos)
  reference = sentencepiece.SentencePieceProcessor(model_file=models[name])
  assert tok.encode("a red cat") == reference.encode("a red cat")
  tokens, mask = tok.tokenize(TEXTS)
  tokens, mask = tokens.numpy(), mask.numpy()
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (len(TEXTS), length)
  for text, row, m in zip(TEXTS, tokens, mask):
    want, n = _expected(tok, text, eos)
    assert row.tolist() == want, text
    np.testing.assert_array_equal(m, np.arange(length) < n)
  lens = np.array([len(reference.encode(t)) for t in TEXTS])
  assert (lens >= length).any() and (lens == 0).any()  # both truncation and empty texts seen
  if eos == "sticky":  # protocol: the last real token is EOT, even when truncated
    assert (tokens[np.arange(len(TEXTS)), mask.sum(1) - 1] == tok.eot_id).all()
  else:  # "yes": truncated rows lose their EOS
    assert (tokens[lens >= length, -1] != tok.eot_id).all()


def test_model_ids_and_pad_override(models):
  default = spm_tokenizer.SentencePieceTokenizer(models["default"])
  assert (default.eot_id, default.pad_id, default.vocab_size) == (2, 0, 300)  # no pad: 0
  explicit = tokenizers.make_tokenizer("sentencepiece", model_path=models["explicit"],
                                       context_length=8)
  assert isinstance(explicit, spm_tokenizer.SentencePieceTokenizer)
  assert (explicit.eot_id, explicit.pad_id, explicit.context_length) == (1, 2, 8)
  siglip_like = spm_tokenizer.SentencePieceTokenizer(models["explicit"], 8, pad_id=1)
  tokens, mask = siglip_like.tokenize(["a cat"])
  assert (tokens.numpy()[~mask.numpy()] == 1).all() and siglip_like.pad_id == 1
  reference = sentencepiece.SentencePieceProcessor(model_file=models["explicit"])
  assert explicit.vocab_size == reference.vocab_size()


def test_any_rank_and_tf_data_graph_mode(models):
  tok = spm_tokenizer.SentencePieceTokenizer(models["default"], context_length=8)
  eager = tok.tokenize(TEXTS[:6])[0].numpy()
  grid, grid_mask = tok.tokenize([TEXTS[:3], TEXTS[3:6]])
  assert grid.shape == grid_mask.shape == (2, 3, 8)
  np.testing.assert_array_equal(grid.numpy().reshape(6, 8), eager)
  scalar = tok.tokenize(TEXTS[0])[0]
  assert scalar.shape == (8,)
  np.testing.assert_array_equal(scalar.numpy(), eager[0])
  ds = tf.data.Dataset.from_tensor_slices(TEXTS[:6]).map(lambda s: tok.tokenize(s))
  assert ds.element_spec[0].shape.as_list() == [8]
  np.testing.assert_array_equal(np.stack([t for t, _ in ds.as_numpy_iterator()]), eager)
  batched = tf.data.Dataset.from_tensor_slices(TEXTS[:6]).batch(4).map(tok.tokenize)
  assert batched.element_spec[1].shape.as_list() == [None, 8]
  np.testing.assert_array_equal(np.concatenate([t for t, _ in batched.as_numpy_iterator()]),
                                eager)


def test_detokenize_round_trip(models):
  tok = spm_tokenizer.SentencePieceTokenizer(models["default"], context_length=32)
  texts = ["a red cat", "café 東京 😀", ""]
  tokens, mask = tok.tokenize(texts)
  assert tok.detokenize(tokens.numpy(), mask.numpy()) == texts
  assert tok.detokenize(tokens.numpy()) == texts


def test_errors(models, tmp_path):
  with pytest.raises(ValueError, match="eos"):
    spm_tokenizer.SentencePieceTokenizer(models["default"], eos="none")
  with pytest.raises(ValueError, match="no EOS"):
    spm_tokenizer.SentencePieceTokenizer(models["no_eos"])
  with pytest.raises(ValueError, match="context_length"):
    spm_tokenizer.SentencePieceTokenizer(models["default"], context_length=1)
  with pytest.raises(ValueError, match="pad_id"):
    spm_tokenizer.SentencePieceTokenizer(models["default"], pad_id=300)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    spm_tokenizer.SentencePieceTokenizer(str(tmp_path / "missing.model"))

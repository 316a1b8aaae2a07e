"""DreamLIP's sub-caption sampling (METHODS.md §1.5), as a tf.data feature function.

A long caption is split into sentences on ``'.'``; the pieces are stripped and the empty
ones dropped. Every example then gets ``K`` of them: ``K`` distinct pieces when it has at
least ``K``, else ``K`` draws with replacement. (DreamLIP's released loader pools the pieces
of six MLLM captions and also splits on newlines and ``</s>``; the shapes data has one long
caption whose sentences end in ``'.'``. The loader's off-by-one that never draws the last
piece is not reproduced.) Pieces are tokenised without their final period.

The draw uses stateless TF randomness keyed by ``(seed, example index)``, so example ``i``
gets the same sub-captions however the pipeline is sharded, parallelised or resumed.

Batch keys added (see :mod:`contrastive_jax.data.pipeline`):

====================  ===========================  =====================================
key                   shape / dtype                meaning
====================  ===========================  =====================================
``subcaptions``       int32 ``[B, K, L]``          tokens of the ``K`` sampled sentences
``subcaption_mask``   bool ``[B, K, L]``           True on real tokens (EOT included)
====================  ===========================  =====================================
"""

from __future__ import annotations

import tensorflow as tf

from contrastive_jax.data.tokenizers import Tokenizer

# Mixed into the per-example key so these draws are independent of the scene's own stream.
_SALT = 0x5C4B
_ALG = tf.random.Algorithm.PHILOX


def split_sentences(text: tf.Tensor) -> tf.Tensor:
  """A scalar ``tf.string`` -> its non-empty, stripped ``'.'``-separated pieces ``[n]``.

  A text with no non-empty piece gives the stripped text itself (``n = 1``) so that
  sampling always has something to draw.
  """
  pieces = tf.strings.strip(tf.strings.split(text, "."))
  pieces = tf.boolean_mask(pieces, tf.strings.length(pieces) > 0)
  return tf.cond(tf.size(pieces) > 0, lambda: pieces,
                 lambda: tf.reshape(tf.strings.strip(text), [1]))


def sample_indices(num_pieces: tf.Tensor, num_samples: int, key: tf.Tensor) -> tf.Tensor:
  """``num_samples`` indices into ``[0, num_pieces)``: distinct when ``num_pieces ≥ num_samples``
  (a random permutation's head), else uniform draws with replacement.

  Args:
    num_pieces: int32 scalar ``n ≥ 1``.
    num_samples: static ``K ≥ 1``.
    key: int64 ``[2]`` stateless seed.

  Returns:
    int32 ``[K]``.
  """
  k_perm, k_draw = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg=_ALG))
  perm = tf.argsort(tf.random.stateless_uniform([num_pieces], k_perm, alg=_ALG))
  distinct = tf.gather(perm, tf.range(num_samples) % num_pieces)
  drawn = tf.random.stateless_uniform([num_samples], k_draw, minval=0, maxval=num_pieces,
                                      dtype=tf.int32, alg=_ALG)
  return tf.cast(tf.where(num_pieces >= num_samples, distinct, drawn), tf.int32)


def subcaption_features(tokenizer: Tokenizer, *, seed: int, num_subcaptions: int = 3,
                        key: str = "long_caption"):
  """The map function ``example -> {"subcaptions", "subcaption_mask"}`` (module docstring).

  Args:
    tokenizer: tokenizes the sampled sentences (``[K] -> [K, L]``).
    seed: the data seed (``config.data.seed``).
    num_subcaptions: ``K``, sentences per example.
    key: the example's long-caption feature; the example must also carry ``index``.

  Returns:
    A function of one source example giving int32 ``subcaptions [K, L]`` and bool
    ``subcaption_mask [K, L]``.
  """
  if num_subcaptions < 1:
    raise ValueError(f"config.data.subcaptions.num_subcaptions={num_subcaptions}; need ≥ 1.")
  length = tokenizer.context_length

  def fn(example):
    if key not in example:
      raise KeyError(f"config.data.subcaptions.key={key!r} is not a feature of the source; "
                     f"available: {sorted(example)}.")
    pieces = split_sentences(example[key])
    base = tf.constant([seed, _SALT], tf.int64)
    rng = tf.random.experimental.stateless_fold_in(
        base, tf.cast(example["index"], tf.int64), alg=_ALG)
    chosen = tf.gather(pieces, sample_indices(tf.size(pieces), num_subcaptions, rng))
    tokens, mask = tokenizer.tokenize(chosen)
    return {"subcaptions": tf.ensure_shape(tokens, [num_subcaptions, length]),
            "subcaption_mask": tf.ensure_shape(mask, [num_subcaptions, length])}

  return fn

"""Late-interaction (FILIP-style) similarity for evaluation, computed in bounded chunks.

Models trained with a token-wise loss are evaluated the way they were trained: the score of
query ``n`` against candidate ``m`` is the mean over the query's valid tokens of their best
cosine with a valid candidate token (:func:`contrastive_jax.losses.filip.late_interaction_scores`).
"""

from __future__ import annotations

import jax
import numpy as np

from contrastive_jax.losses.filip import late_interaction_scores

# Largest [queries, candidates, T_q, T_k] similarity block evaluated at once (floats).
MAX_BLOCK_FLOATS = 1 << 24


_block_scores = jax.jit(late_interaction_scores)


def scores(query_tokens: np.ndarray, query_mask: np.ndarray, key_tokens: np.ndarray,
           key_mask: np.ndarray) -> np.ndarray:
  """``[n, m]`` late-interaction scores of normalised token sets.

  Args:
    query_tokens: float32 ``[n, Tq, D]`` L2-normalised tokens (padded ones zeroed).
    query_mask: bool ``[n, Tq]``.
    key_tokens: float32 ``[m, Tk, D]``; key_mask: bool ``[m, Tk]``.
  """
  n, tq = query_mask.shape
  m, tk = key_mask.shape
  key_chunk = max(1, min(m, MAX_BLOCK_FLOATS // (tq * tk)))
  query_chunk = max(1, min(n, MAX_BLOCK_FLOATS // (key_chunk * tq * tk)))
  out = np.zeros((n, m), np.float32)
  # Padding every chunk to the full chunk size keeps one compiled shape per call site.
  pad = lambda x, size: np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)])
  for j in range(0, m, key_chunk):
    keys, kmask = key_tokens[j:j + key_chunk], key_mask[j:j + key_chunk]
    kn = len(keys)
    keys, kmask = pad(keys, key_chunk), pad(kmask, key_chunk)
    for i in range(0, n, query_chunk):
      queries, qmask = query_tokens[i:i + query_chunk], query_mask[i:i + query_chunk]
      qn = len(queries)
      block = _block_scores(pad(queries, query_chunk), pad(qmask, query_chunk), keys, kmask)
      out[i:i + qn, j:j + kn] = np.asarray(block)[:qn, :kn]
  return out

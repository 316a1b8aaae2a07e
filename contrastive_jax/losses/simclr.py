"""SimCLR's NT-Xent loss (Chen et al., 2020), METHODS.md §1.7.

Two views ``h¹, h²`` of ``B`` examples give ``2B`` anchors; anchor ``ĥ¹_i`` has its positive
``ĥ²_i`` and the ``2B − 2`` other embeddings of both views as negatives (itself excluded):

  ``ℓ¹_i = −log exp(ĥ¹_i·ĥ²_i/τ) / (Σ_j exp(ĥ¹_i·ĥ²_j/τ) + Σ_{j≠i} exp(ĥ¹_i·ĥ¹_j/τ))``

and ``ℓ²_i`` alike with the views swapped. The loss is the paper's mean over the ``2B``
anchors, ``(1/2B) Σ_i (ℓ¹_i + ℓ²_i)`` (= SLIP's ``(loss_a + loss_b)/2``; the TF reference
sums the two directions, twice this value).

Distributed form (pattern L): each device scores its ``2b`` local anchors against both
views all-gathered with gradient (``[2b, 2B]`` logits); the self-similarity is masked at the
anchor's *global* column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

# Added to masked logits: finite, so fully masked rows could not produce NaN gradients.
_MASKED = -1e9


def nt_xent_logits(z1, z2, temperature, *, axis_name=None):
  """Logits of the ``2b`` local anchors against the ``2B`` global candidates.

  Args:
    z1: ``[b, D]`` first-view embeddings (local shard when ``axis_name`` is set).
    z2: ``[b, D]`` second-view embeddings, paired row by row with ``z1``.
    temperature: ``τ`` (logits are cosine similarities divided by it).
    axis_name: mapped data axis, or None.

  Returns:
    ``(logits, positives)``: float32 ``[2b, 2B]`` with each anchor's own column set to a large
    negative value, and int32 ``[2b]`` global column of each anchor's positive. Rows are
    ``[z1 anchors; z2 anchors]``, columns ``[all z1; all z2]``.
  """
  a = jnp.concatenate([common.l2_normalize(z1), common.l2_normalize(z2)], axis=0)
  b = z1.shape[0]
  h1_all = common.all_gather_rows(a[:b], axis_name)
  h2_all = common.all_gather_rows(a[b:], axis_name)
  global_b = h1_all.shape[0]
  cands = jnp.concatenate([h1_all, h2_all], axis=0)
  logits = (a @ cands.T) / temperature
  rows = common.shard_offset(b, axis_name) + jnp.arange(b)
  own = jnp.concatenate([rows, rows + global_b])
  positives = jnp.concatenate([rows + global_b, rows])
  self_mask = jnp.arange(2 * global_b)[None, :] == own[:, None]
  logits = jnp.where(self_mask, _MASKED, logits)
  return logits, positives.astype(jnp.int32)


def nt_xent_loss(z1, z2, temperature=0.1, *, axis_name=None):
  """NT-Xent over the global batch: mean over the ``2B`` anchors (the paper's convention).

  Args:
    z1: ``[b, D]`` projection-head outputs of the first view, any float dtype; the local shard
      when ``axis_name`` is given. Normalised inside, in float32.
    z2: ``[b, D]`` second view, paired row by row with ``z1``.
    temperature: ``τ`` (SimCLR/SLIP: 0.1), a static hyperparameter.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss, identical on every device, whose
    gradient w.r.t. the local inputs equals the single-device gradient on the concatenated
    batch; ``metrics`` holds ``acc`` (fraction of anchors whose highest logit is their
    positive), ``pos_logit`` and ``neg_logit`` (mean positive / negative logit).
  """
  logits, positives = nt_xent_logits(z1, z2, temperature, axis_name=axis_name)
  two_b = logits.shape[1]  # 2B anchors in all, 2B candidates each
  pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
  xent = jax.nn.logsumexp(logits, axis=1) - pos
  loss = common.global_sum(jnp.sum(xent), axis_name) / two_b

  hit = (jnp.argmax(logits, axis=1) == positives).astype(jnp.float32)
  valid = logits > _MASKED / 2
  neg_sum = jnp.sum(jnp.where(valid, logits, 0.0)) - jnp.sum(pos)
  num_neg = float(two_b) * (two_b - 2)  # float: B² overflows int32
  metrics = {
      "acc": common.global_sum(jnp.sum(hit), axis_name) / two_b,
      "pos_logit": common.global_sum(jnp.sum(pos), axis_name) / two_b,
      "neg_logit": (common.global_sum(neg_sum, axis_name) / num_neg) if num_neg else 0.0,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

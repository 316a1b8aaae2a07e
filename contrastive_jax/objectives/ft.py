"""MoCo-v2 with Feature Transformation (FT; Zhu et al., ICCV 2021), METHODS.md §2.10.

The MoCo-v2 machinery of :class:`contrastive_jax.objectives.mochi.Mochi` (query encoder on
view 0, EMA momentum encoder on view 1, a replicated FIFO queue of past keys), with the logits
computed on FT's transformed features
(:func:`contrastive_jax.losses.feature_transform.ft_moco_loss`): the positive pair is
extrapolated (``λ⁺ = 1 + Beta(α⁺, α⁺)``) and the queue interpolated with a permutation of
itself (``λ⁻ ~ Beta(α⁻, α⁻)``). The queue is updated with the original keys. MoCHi's mixing
is not used (``num_mix = num_query_mix = 0``).

FT's draws use ``fold_in(objective_state['mix_rng'], step)``, the same key on every device,
and each query's global row, so they do not depend on the number of devices.

``config.loss``: MoCo's ``temperature`` (0.2), ``queue_size``, ``momentum``,
``momentum_schedule``; FT's ``alpha_pos`` (2.0; None: no positive extrapolation),
``alpha_neg`` (1.6; None: no negative interpolation), ``extrapolate`` (True), ``per_dim``
(False: one ``λ`` per step, the reference's ``dim_mask='none'``), ``renormalize`` (False, the
reference's published command).
"""

from __future__ import annotations

from contrastive_jax.losses.feature_transform import ft_moco_loss
from contrastive_jax.objectives import mochi


class FeatureTransform(mochi.Mochi):
  """MoCo-v2 + FT objective (see the module docstring)."""

  def __init__(self, config, tokenizer=None):
    super().__init__(config, tokenizer)
    if self.num_mix or self.num_query_mix:
      raise ValueError("The FT objective does not mix MoCHi negatives; set "
                       "config.loss.num_mix = num_query_mix = 0.")
    lc = config.loss
    self.ft_kwargs = dict(alpha_pos=lc.get("alpha_pos", 2.0), alpha_neg=lc.get("alpha_neg", 1.6),
                          extrapolate=lc.get("extrapolate", True),
                          per_dim=lc.get("per_dim", False),
                          renormalize=lc.get("renormalize", False))

  def _moco(self, q, k, queue, rng, axis_name, mixing: bool):
    del mixing  # FT transforms every step
    return ft_moco_loss(q, k, queue, self.temperature, rng=rng, axis_name=axis_name,
                        **self.ft_kwargs)

"""iSogCLR: global contrastive loss with individualised, learned temperatures
(METHODS.md §1.11), on two image views.

Each training example has its own temperature and moving-average estimators, one set per
view's anchors, kept in ``objective_state['isogclr']`` as ``[N, 2]`` arrays indexed by the
dataset id of the example (batch key ``index``; the source must be finite:
``config.data.num_examples`` = ``config.loss.num_examples`` = N). The state is replicated:
every device applies the same scatter of the global batch's rows
(:func:`contrastive_jax.losses.isogclr.isogclr_loss`), so it is checkpointed and restored
with the rest of the train state.

The views go through the backbone and projector together (like SimCLR); anchors of view 1
contrast with the ``2B − 2`` other embeddings of both views (the unimodal form).

``config.loss``: ``num_examples``, ``tau_init``, ``gamma`` (moving-average rate),
``rho`` (DRO radius), ``eta`` (temperature step), ``beta_u`` (its momentum), ``tau_min``,
``tau_max``.
"""

from __future__ import annotations

from contrastive_jax.losses import isogclr as isogclr_losses
from contrastive_jax.objectives import image_ssl
from contrastive_jax.objectives.simclr import SimClr

_HYPER = ("gamma", "rho", "eta", "beta_u", "tau_min", "tau_max")


class ISogClr(SimClr):
  """iSogCLR objective (see the module docstring)."""

  batch_keys = ("views", "index")

  def __init__(self, config, tokenizer=None):
    image_ssl.ImageObjective.__init__(self, config, tokenizer)
    lc = config.loss
    self.num_examples = lc.num_examples
    if config.data.get("num_examples", self.num_examples) != self.num_examples:
      raise ValueError(f"config.loss.num_examples={self.num_examples} but the training data "
                       f"has config.data.num_examples={config.data.num_examples}.")
    self.tau_init = lc.get("tau_init", 0.1)
    self.hyper = {k: lc[k] for k in _HYPER if k in lc}

  def init(self, rng, batch):
    params, state = super().init(rng, batch)
    state["isogclr"] = isogclr_losses.init_state(self.num_examples, tau_init=self.tau_init)
    return params, state

  def loss(self, params, state, batch, rng, *, axis_name=None):
    del rng
    z, batch_stats = self.embed(params, state, batch, axis_name)
    loss, (metrics, isogclr_state) = isogclr_losses.isogclr_loss(
        z[:, 0], z[:, 1], batch["index"], state["isogclr"], axis_name=axis_name, **self.hyper)
    return loss, (metrics, dict(state, batch_stats=batch_stats, isogclr=isogclr_state))

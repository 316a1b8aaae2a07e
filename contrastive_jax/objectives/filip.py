"""FILIP: two towers trained with token-wise late interaction (METHODS.md §1.3)."""

from __future__ import annotations

from contrastive_jax import losses
from contrastive_jax.objectives.clip import Clip


class Filip(Clip):
  """Image-text pretraining with FILIP's loss on the projected patch and text tokens, in its
  memory-lean ring form (:func:`contrastive_jax.losses.ring_filip_loss`, equal to
  ``filip_loss``).

  ``config.loss.keep_image_tokens`` (a fraction in (0, 1], default 1) keeps a random subset of
  every image's patch tokens each step (the paper's token reduction, drawn from the step's
  ``rng``); ``config.loss.block_size`` sets the rows scored at once by the ring loss.
  Evaluate with ``config.eval.scoring = "late_interaction"`` (the token-wise scores the model
  was trained on).
  """

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.keep_image_tokens = config.loss.get("keep_image_tokens")

  def embed(self, params, state, batch):
    del state
    out = self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_mask"])
    return {k: out[k] for k in ("image_tokens", "text_tokens", "text_mask", "logit_scale")}

  def contrast(self, out, state, rng, *, axis_name=None):
    loss, metrics = losses.ring_filip_loss(
        out["image_tokens"], out["text_tokens"], out["text_mask"], out["logit_scale"],
        keep_image_tokens=self.keep_image_tokens, rng=rng, block_size=self.block_size,
        axis_name=axis_name)
    metrics["logit_scale"] = out["logit_scale"]
    return loss, (metrics, state)

"""Pure contrastive losses: ``fn(*arrays, *, hyperparameters, axis_name=None) -> (loss, metrics)``.

Depends on jax only. With ``axis_name`` the arrays are the local shard of a batch sharded
over that mapped axis; the loss is the global-batch mean and the same on every device.
"""

from contrastive_jax.losses.clip import clip_logits, clip_loss, convirt_loss, infonce_from_logits
from contrastive_jax.losses.clip_ring import ring_clip_loss
from contrastive_jax.losses.common import l2_normalize
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss

__all__ = ["clip_logits", "clip_loss", "convirt_loss", "filip_loss", "infonce_from_logits",
           "l2_normalize", "ring_clip_loss", "ring_siglip_loss", "siglip_loss"]

"""Pure contrastive losses: ``fn(*arrays, *, hyperparameters, axis_name=None) -> (loss, metrics)``.

Depends on jax only. With ``axis_name`` the arrays are the local shard of a batch sharded
over that mapped axis; the loss is the global-batch mean and the same on every device.
"""

from contrastive_jax.losses.clip import clip_logits, clip_loss, convirt_loss, infonce_from_logits
from contrastive_jax.losses.clip_ring import ring_clip_loss
from contrastive_jax.losses.common import l2_normalize
from contrastive_jax.losses.dcl import dcl_loss
from contrastive_jax.losses.dreamlip import (circle_multi_positive_loss, dreamlip_loss,
                                           grouping_loss, multi_positive_loss,
                                           ring_multi_positive_loss)
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.filip_ring import ring_filip_loss
from contrastive_jax.losses.isogclr import isogclr_loss
from contrastive_jax.losses.moco import enqueue, mix_hard_negatives, moco_loss
from contrastive_jax.losses.pixpro import pixel_propagation, pixpro_loss, positive_pixel_mask
from contrastive_jax.losses.protoclip import (back_translate, external_teacher_loss,
                                             prototype_loss, soft_targets)
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss
from contrastive_jax.losses.simclr import nt_xent_logits, nt_xent_loss
from contrastive_jax.losses.simclr_ring import ring_dcl_loss, ring_nt_xent_loss
from contrastive_jax.losses.swav import sinkhorn, swav_loss

__all__ = [
    "back_translate", "circle_multi_positive_loss", "clip_logits", "clip_loss", "convirt_loss",
    "dcl_loss", "dreamlip_loss", "enqueue", "external_teacher_loss", "filip_loss", "grouping_loss",
    "infonce_from_logits", "isogclr_loss", "l2_normalize", "mix_hard_negatives", "moco_loss",
    "multi_positive_loss", "nt_xent_logits", "nt_xent_loss", "pixel_propagation", "pixpro_loss",
    "positive_pixel_mask", "prototype_loss", "ring_clip_loss", "ring_dcl_loss",
    "ring_filip_loss", "ring_multi_positive_loss", "ring_nt_xent_loss", "ring_siglip_loss",
    "siglip_loss", "sinkhorn", "soft_targets", "swav_loss",
]

"""Pure contrastive losses: ``fn(*arrays, *, hyperparameters, axis_name=None) -> (loss, metrics)``.

Depends on jax only. With ``axis_name`` the arrays are the local shard of a batch sharded
over that mapped axis; the loss is the global-batch mean and the same on every device.
"""

from contrastive_jax.losses.beclr import beclr_loss, dyce_update
from contrastive_jax.losses.cacr import cacr_loss
from contrastive_jax.losses.clip import clip_logits, clip_loss, convirt_loss, infonce_from_logits
from contrastive_jax.losses.clip_ring import ring_clip_loss
from contrastive_jax.losses.common import l2_normalize
from contrastive_jax.losses.dcl import dcl_loss
from contrastive_jax.losses.dreamlip import (circle_multi_positive_loss, dreamlip_loss,
                                           grouping_loss, multi_positive_loss,
                                           ring_multi_positive_loss)
from contrastive_jax.losses.filip import filip_loss
from contrastive_jax.losses.filip_ring import ring_filip_loss
from contrastive_jax.losses.feature_transform import ft_moco_loss
from contrastive_jax.losses.groco import diffsort_oddeven, groco_loss
from contrastive_jax.losses.isogclr import isogclr_loss
from contrastive_jax.losses.mlcd import mlcd_loss, multilabel_pos_neg_loss
from contrastive_jax.losses.moco import enqueue, mix_hard_negatives, moco_loss
from contrastive_jax.losses.pixpro import pixel_propagation, pixpro_loss, positive_pixel_mask
from contrastive_jax.losses.protoclip import (back_translate, external_teacher_loss,
                                             prototype_loss, soft_targets)
from contrastive_jax.losses.sbcl import sbcl_loss
from contrastive_jax.losses.siglip import siglip_loss
from contrastive_jax.losses.siglip_ring import ring_siglip_loss
from contrastive_jax.losses.simclr import nt_xent_logits, nt_xent_loss
from contrastive_jax.losses.simclr_ring import ring_dcl_loss, ring_nt_xent_loss
from contrastive_jax.losses.suppression import same_cluster_nt_xent_loss
from contrastive_jax.losses.swav import sinkhorn, swav_loss
from contrastive_jax.losses.debcse import ipw_sample, ipw_weights, weighted_info_nce
from contrastive_jax.losses.hydra import hydra_loss, partner_labels
from contrastive_jax.losses.supcon import multi_positive_nce, supcon_loss
from contrastive_jax.losses.supremix import supremix_loss
from contrastive_jax.losses.whitening import group_whiten, whitenedcse_loss
from contrastive_jax.losses.xclip import aosm, xclip_loss, xclip_scores
from contrastive_jax.losses.geometry import alignment, geometry_metrics, tolerance, uniformity
from contrastive_jax.losses.hard_info_nce import hard_info_nce_loss
from contrastive_jax.losses.sepclr import sepclr_loss
from contrastive_jax.losses.soft_contrastive import soft_contrastive_loss
from contrastive_jax.losses.dito import box_pool, region_embeddings, region_text_loss

__all__ = [
    "box_pool", "region_embeddings", "region_text_loss",
    "alignment", "geometry_metrics", "hard_info_nce_loss", "sepclr_loss",
    "soft_contrastive_loss", "tolerance", "uniformity",
    "back_translate", "circle_multi_positive_loss", "clip_logits", "clip_loss", "convirt_loss",
    "dcl_loss", "dreamlip_loss", "enqueue", "external_teacher_loss", "filip_loss", "grouping_loss",
    "infonce_from_logits", "isogclr_loss", "l2_normalize", "mix_hard_negatives", "moco_loss",
    "multi_positive_loss", "nt_xent_logits", "nt_xent_loss", "pixel_propagation", "pixpro_loss",
    "positive_pixel_mask", "prototype_loss", "ring_clip_loss", "ring_dcl_loss",
    "ring_filip_loss", "ring_multi_positive_loss", "ring_nt_xent_loss", "ring_siglip_loss",
    "siglip_loss", "sinkhorn", "soft_targets", "swav_loss",
    "cacr_loss", "diffsort_oddeven", "groco_loss",
    "ft_moco_loss", "same_cluster_nt_xent_loss",
    "beclr_loss", "dyce_update", "mlcd_loss", "multilabel_pos_neg_loss", "sbcl_loss",
    "aosm", "group_whiten", "hydra_loss", "ipw_sample", "ipw_weights", "multi_positive_nce",
    "partner_labels", "supcon_loss", "supremix_loss", "weighted_info_nce", "whitenedcse_loss",
    "xclip_loss", "xclip_scores",
]

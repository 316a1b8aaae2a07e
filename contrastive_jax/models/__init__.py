"""flax.linen models: ViT, ResNet, causal text transformer, two-tower wrapper, projection heads."""

from contrastive_jax.models.backbones import ViTBackbone, make_backbone
from contrastive_jax.models.heads import MLPHead
from contrastive_jax.models.resnet import RESNET_STAGES, ResNet, resnet
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.transformer import Transformer
from contrastive_jax.models.two_tower import CLIP_LOGIT_SCALE_INIT, TwoTower
from contrastive_jax.models.vit import ViT

__all__ = [
    "CLIP_LOGIT_SCALE_INIT", "MLPHead", "RESNET_STAGES", "ResNet", "TextTransformer",
    "Transformer", "TwoTower", "ViT", "ViTBackbone", "make_backbone", "resnet",
]

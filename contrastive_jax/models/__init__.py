"""flax.linen models: ViT, causal text transformer, two-tower wrapper, projection heads."""

from contrastive_jax.models.heads import MLPHead
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.transformer import Transformer
from contrastive_jax.models.two_tower import CLIP_LOGIT_SCALE_INIT, TwoTower
from contrastive_jax.models.vit import ViT

__all__ = ["CLIP_LOGIT_SCALE_INIT", "MLPHead", "TextTransformer", "Transformer", "TwoTower", "ViT"]

"""Objectives: which inputs, which model outputs, which loss, which extra state.

``OBJECTIVES`` maps ``config.objective`` to a class built as ``cls(config, tokenizer)``
(``tokenizer`` is None for image-only configs);
see :mod:`contrastive_jax.objectives.base` for the interface.
"""

from contrastive_jax.objectives.adclip import AdClip
from contrastive_jax.objectives.beclr import Beclr
from contrastive_jax.objectives.cacr import Cacr
from contrastive_jax.objectives.clip import Clip, Convirt
from contrastive_jax.objectives.cliprocket import ClipRocket
from contrastive_jax.objectives.dreamlip import DreamLip
from contrastive_jax.objectives.filip import Filip
from contrastive_jax.objectives.ft import FeatureTransform
from contrastive_jax.objectives.groco import GroCo
from contrastive_jax.objectives.hydra import Hydra
from contrastive_jax.objectives.isogclr import ISogClr
from contrastive_jax.objectives.mlcd import Mlcd
from contrastive_jax.objectives.mochi import Mochi
from contrastive_jax.objectives.pixpro import PixPro
from contrastive_jax.objectives.protoclip import ProtoClip
from contrastive_jax.objectives.sbcl import Sbcl
from contrastive_jax.objectives.siglip import Siglip
from contrastive_jax.objectives.simclr import Dcl, SimClr
from contrastive_jax.objectives.slip import Slip
from contrastive_jax.objectives.supremix import SupReMix
from contrastive_jax.objectives.swav import Swav

OBJECTIVES = {"clip": Clip, "convirt": Convirt, "siglip": Siglip, "filip": Filip,
              "dreamlip": DreamLip,
              "protoclip": ProtoClip,
              "slip": Slip, "cliprocket": ClipRocket,
              # image-only (self-supervised)
              "simclr": SimClr, "dcl": Dcl, "swav": Swav, "mochi": Mochi, "pixpro": PixPro,
              "isogclr": ISogClr,
              "groco": GroCo, "cacr": Cacr, "ft": FeatureTransform,
              "mlcd": Mlcd, "beclr": Beclr, "sbcl": Sbcl,
              "hydra": Hydra, "supremix": SupReMix,
              # training-free / prompt adaptation of a frozen checkpoint
              "adclip": AdClip}


def make_objective(config, tokenizer):
  if config.objective not in OBJECTIVES:
    raise ValueError(f"config.objective={config.objective!r}; known objectives: "
                     f"{sorted(OBJECTIVES)}.")
  return OBJECTIVES[config.objective](config, tokenizer)

"""Objectives: which inputs, which model outputs, which loss, which extra state.

``OBJECTIVES`` maps ``config.objective`` to a class built as ``cls(config, tokenizer)``;
see :mod:`contrastive_jax.objectives.base` for the interface.
"""

from contrastive_jax.objectives.clip import Clip, Convirt

OBJECTIVES = {"clip": Clip, "convirt": Convirt}


def make_objective(config, tokenizer):
  if config.objective not in OBJECTIVES:
    raise ValueError(f"config.objective={config.objective!r}; known objectives: "
                     f"{sorted(OBJECTIVES)}.")
  return OBJECTIVES[config.objective](config, tokenizer)

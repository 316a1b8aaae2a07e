"""Where the train state lives on the mesh: replicated, or FSDP-sharded by flax logical axes.

The models name their parameters' dimensions with flax logical axes
(``nn.with_logical_partitioning``: ``embed`` for the model width, ``mlp``, ``heads``, ``kv``,
``vocab``, ...). :data:`RULES` maps them onto the mesh: FSDP shards every parameter that has
an ``embed`` dimension over the ``fsdp`` mesh axis and replicates the rest (biases, norms,
scalars). Optimizer moments follow their parameters (``optax.tree_utils.tree_map_params``);
the step, rng and objective state are replicated. The compiler gathers each weight where it
is used, so a model needs ``1 / fsdp`` of its parameter and optimizer memory per device.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import parallel

# (logical axis, mesh axis); logical axes not listed are replicated.
RULES: Tuple[Tuple[str, Any], ...] = (("embed", parallel.FSDP_AXIS),)


def unbox(tree: Any) -> Any:
  """``tree`` without flax partitioning metadata (plain arrays)."""
  return nn.meta.unbox(tree)


def param_shardings(boxed_params: Any, mesh: Mesh,
                    rules: Sequence[Tuple[str, Any]] = RULES) -> Any:
  """``NamedSharding`` of every parameter, from abstract parameters carrying flax logical
  axes (``jax.eval_shape(objective.init, ...)[0]``).

  With ``fsdp = 1`` everything is replicated. Raises a ValueError naming the parameter when
  a sharded dimension does not divide by the ``fsdp`` axis size.
  """
  if mesh.shape[parallel.FSDP_AXIS] == 1:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), unbox(boxed_params))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)
  shapes = unbox(boxed_params)

  def check(path, leaf, sharding):
    for dim, axes in zip(leaf.shape, sharding.spec):
      size = 1
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        size *= mesh.shape[axis] if axis is not None else 1
      if dim % size:
        raise ValueError(
            f"Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
            f"over {axes}={size} along its dimension of size {dim}; choose a "
            "config.parallel.fsdp_axis_size that divides the model width.")
    return sharding

  return jax.tree_util.tree_map_with_path(check, shapes, shardings)


def state_shardings(abstract_state: Any, params_sharding: Any,
                    optimizer: optax.GradientTransformation, mesh: Mesh) -> Any:
  """Shardings of a :class:`~contrastive_jax.train_state.TrainState`: parameters as given,
  optimizer moments like their parameters, everything else replicated."""
  replicated = NamedSharding(mesh, P())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # leaves optax.masked leaves out
  opt_state = optax.tree_utils.tree_map_params(
      optimizer, lambda leaf, sharding: leaf if masked(leaf) else sharding,
      abstract_state.opt_state, params_sharding,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return abstract_state.replace(
      step=replicated, params=params_sharding, opt_state=opt_state,
      objective_state=jax.tree.map(lambda _: replicated, abstract_state.objective_state),
      rng=replicated)


def bytes_per_device(tree: Any) -> int:
  """Bytes of ``tree``'s arrays held by the first device (a sharded leaf counts its shard)."""
  device = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
  return total

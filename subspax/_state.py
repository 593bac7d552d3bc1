"""Inspecting optimizer states: exact byte counts and shardings."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from subspax import _quantized
from subspax import _state_types


def state_bytes(state: Any) -> int:
  """Exact number of bytes held by every array in an optimizer state.

  Works for any optax state (and for ``jax.eval_shape`` results): it sums
  ``size * itemsize`` over the leaves, so nothing is allocated.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> subspax.state_bytes(optax.adam(1e-3).init({'w': jnp.zeros((4, 4))}))
    132

  Args:
    state: A pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    The total size in bytes.
  """
  return sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(state) if hasattr(x, "shape"))


def _is_projected(x) -> bool:
  return isinstance(x, _state_types.ProjectedState)


def _reduced_shardings(state: _state_types.ProjectedState,
                       sharding: NamedSharding) -> _state_types.ProjectedState:
  """Shardings of a ProjectedState from its parameter's NamedSharding.

  The kept dimension ``D`` keeps the parameter's mesh axes, the projected
  dimension ``d`` of the basis keeps its own, batch axes (layers) keep theirs.
  The rank axis of the ``(r, D)`` moments takes the mesh axes of ``d`` (the
  dimension the projection removed) when they divide ``r``, and is
  replicated otherwise: under FSDP the moments are split over the same
  devices as their parameter, not copied to each (ZeRO's sharded optimizer
  state). 8-bit moments' codes shard like ``mu``, their block scales along
  their block axis with the same mesh axes when those divide it (blocks run
  along ``D``), replicated otherwise.
  """
  batch, d_axis, big_d_axis = state.layout.reduced_specs(sharding.spec)

  def named(*entries):
    return NamedSharding(sharding.mesh, PartitionSpec(*batch, *entries))

  def ways(entry):
    axes = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([sharding.mesh.shape[a] for a in axes if a]))

  def rank_axis(x):
    """``d``'s mesh axes for the rank axis (second to last) of ``x``."""
    return d_axis if x.shape[-2] % ways(d_axis) == 0 else None

  def moment_sharding(x):
    if not isinstance(x, _quantized.QuantizedArray):
      return named(rank_axis(x), big_d_axis)
    blocks = x.scales.shape[-1]
    block_axis = big_d_axis if blocks % ways(big_d_axis) == 0 else None
    return dataclasses.replace(x, codes=named(rank_axis(x.codes), big_d_axis),
                               scales=named(rank_axis(x.scales), block_axis))

  def basis_sharding(x):
    return named(d_axis, None) if x.ndim == len(batch) + 2 else named(None)

  return _state_types.ProjectedState(
      basis=jax.tree.map(basis_sharding, state.basis),
      mu=moment_sharding(state.mu),
      nu=moment_sharding(state.nu),
      age=jax.tree.map(lambda x: named(*(None,) * (x.ndim - len(batch))),
                       state.age),
      last_norm=jax.tree.map(lambda x: named(), state.last_norm),
      displacement=jax.tree.map(lambda x: named(rank_axis(x), big_d_axis),
                                state.displacement),
      layout=state.layout)


def state_shardings(tx: optax.GradientTransformation, params: Any,
                    param_shardings: Any) -> Any:
  """Shardings for ``tx.init(params)`` derived from the params' shardings.

  * subspax's reduced states are sharded along the dimension they keep (for
    ``(r, D)`` moments, ``D`` takes the parameter's mesh axes) instead of being
    replicated;
  * any other state leaf with its parameter's path and shape (Adam's ``mu``
    and ``nu``, ``MultiSteps``' accumulators) takes the parameter's sharding;
  * everything else (counts, keys, scalars) is replicated.

  Works for any optax transformation, subspax or not, through ``chain``,
  ``partition``, ``inject_hyperparams`` and other wrappers: a state leaf
  belongs to a parameter when the parameter's pytree path appears in its path.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('model',),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> params = {'w': jnp.zeros((16, 32))}
    >>> tx = subspax.subtrack(1e-3, rank=4)
    >>> shardings = subspax.state_shardings(
    ...     tx, params, {'w': NamedSharding(mesh, P(None, 'model'))})
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)

  Args:
    tx: The optimizer.
    params: Parameters (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings: A pytree of ``NamedSharding`` matching ``params``.

  Returns:
    A pytree of shardings with the structure of ``tx.init(params)``.
  """
  abstract_state = jax.eval_shape(tx.init, params)
  by_path = {
      tuple(path): (param, sharding)
      for (path, param), sharding in zip(
          jax.tree_util.tree_flatten_with_path(params)[0],
          jax.tree.leaves(param_shardings))
  }
  any_sharding = jax.tree.leaves(param_shardings)[0]
  if not isinstance(any_sharding, NamedSharding):
    return jax.tree.map(lambda _: any_sharding, abstract_state)
  replicated = NamedSharding(any_sharding.mesh, PartitionSpec())

  def owner(path):
    path = tuple(path)
    for length in range(len(path), 0, -1):
      for start in range(len(path) - length + 1):
        found = by_path.get(path[start:start + length])
        if found is not None:
          return found
    return None, None

  def sharding_of(path, leaf):
    param, sharding = owner(path)
    if _is_projected(leaf):
      if sharding is None:
        return jax.tree.map(lambda _: replicated, leaf)
      return _reduced_shardings(leaf, sharding)
    if sharding is not None and leaf.shape == param.shape:
      return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_state,
                                          is_leaf=_is_projected)


def overwritten(tx: optax.GradientTransformation, params: Any) -> Any:
  """Which gradients ``tx.update`` overwrites in place: a bool per parameter.

  A subspax method writes a projected parameter's update into that
  parameter's gradient buffer (so that XLA reuses a donated gradient for the
  update). Whoever reads those gradients beside ``tx.update`` (a norm, a
  clip) must read them first, or XLA keeps a copy of each one
  (:func:`subspax.ordering.run_after`, :func:`subspax.clip_by_global_norm`'s
  ``in_place``). The answer comes from the transformation's own state: the
  parameters that hold a ``ProjectedState`` anywhere in it.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> params = {'w': jnp.zeros((8, 16)), 'b': jnp.zeros(16)}
    >>> subspax.overwritten(subspax.subtrack(1e-3, rank=2), params)
    {'b': False, 'w': True}
    >>> subspax.overwritten(optax.adamw(1e-3), params)
    {'b': False, 'w': False}

  Args:
    tx: Any optax transformation (chains and wrappers included).
    params: The parameters (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A tree of ``params``' structure with a bool per leaf.
  """
  state = jax.eval_shape(tx.init, params)
  structure = jax.tree.structure(params)
  found = jax.tree.map(lambda _: False, params)
  for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, _state_types.SubspaceAdamState)):
    if not isinstance(node, _state_types.SubspaceAdamState):
      continue
    matrices = jax.tree.leaves(node.matrices, is_leaf=lambda x: isinstance(
        x, (_state_types.ProjectedState, optax.MaskedNode)))
    if len(matrices) != structure.num_leaves:
      continue  # a state of another tree (e.g. a masked part of params)
    found = jax.tree.map(lambda f, m: f or _is_projected(m), found,
                         structure.unflatten(matrices))
  return found

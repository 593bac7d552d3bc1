"""Gradients accumulated in the reduced space: project, refresh, then update.

For a projected parameter the core's step reads its gradient ``G`` only
through the reduced gradient ``R = S^T G`` (``r x D``; GRASS: ``r`` scaled
rows), unless the recovery term or APOLLO's scaled gradient is on: those read
``G`` itself. ``R`` is linear in ``G``, so the mean gradient of ``k``
micro-batches needs only the sum of their ``R``s, never the full-size sum.
Three calls make such a step (docs/trainer.md, "Micro-batches in the
reduced space"):

1. on a refresh step, :func:`refresh_subspaces` refreshes the subspaces from
   a full gradient (one micro-batch's) and applies the moment policy, without
   an Adam step;
2. :func:`reduce_gradients` gives each micro-batch's reduced gradients (the
   other parameters' gradients unchanged), to be summed;
3. :func:`update_from_reduced` takes the one optimizer step from the mean.

The result equals ``tx.update`` of the mean full gradient (with the same
subspaces) for every method whose update reads only ``R``: GaLore,
SubTrack++/GrassWalk/GrassJump with ``recovery=False``, RSO, GRASS without
recovery, and plain Adam on the other parameters.

References:
  Zhao et al., GaLore, https://arxiv.org/abs/2403.03507
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from subspax import _blocks
from subspax import _state_types
from subspax import _stored_basis

MaskedNode = optax.MaskedNode


def refresh_subspaces(tx: optax.GradientTransformation, grads: Any,
                      state: Any, params: Any = None, **extra_args) -> Any:
  """``state`` with its subspaces refreshed from ``grads``, no step taken.

  Each projected parameter gets the basis a step's refresh computes from
  ``grads`` and its moments go through the moment policy (keep, reset,
  rotate, overlap); the counts, every other state and the parameters are
  unchanged. ``extra_args`` go to ``tx.update``; ``refresh=True`` refreshes
  whatever the count (the default, None, decides from the count).

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.galore(1e-2, rank=2)
    >>> params = {'w': jnp.ones((8, 16))}
    >>> grads = {'w': jnp.arange(128.0).reshape(8, 16)}
    >>> state = subspax.refresh_subspaces(tx, grads, tx.init(params), params,
    ...                                   refresh=True)
    >>> inner = state[0].inner_states['subspace'].inner_state
    >>> int(inner.count), inner.matrices['w'].basis.s.shape
    (0, (8, 2))

  Args:
    tx: A transformation with subspax's core in it (others: no effect).
    grads: The full gradient to refresh from, in the parameters' structure.
    state: ``tx``'s state.
    params: The parameters (or None, where ``tx`` does not need them).
    **extra_args: More arguments of ``tx.update`` (``layer``, ``refresh``).

  Returns:
    The new state.
  """
  tx = optax.with_extra_args_support(tx)
  _, new = tx.update(grads, state, params, refresh_only=True, **extra_args)
  return keep_subspaces(state, new)


def keep_subspaces(old: Any, new: Any) -> Any:
  """``old`` with every projected parameter's state taken from ``new``."""
  is_projected = lambda x: isinstance(x, _state_types.ProjectedState)
  return jax.tree.map(lambda o, n: n if is_projected(n) else o, old, new,
                      is_leaf=is_projected)


def reduce_gradients(grads: Any, state: Any) -> Any:
  """Each projected parameter's gradient as its reduced gradient ``R``.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.galore(1e-2, rank=2)
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
    >>> reduced = subspax.reduce_gradients(params, tx.init(params))
    >>> reduced['w'].shape, reduced['b'].shape  # (r, D); b is not projected
    ((2, 16), (16,))

  Args:
    grads: A gradient (or a part of one: ``MaskedNode`` leaves stay) in the
      parameters' structure.
    state: The state of a transformation with subspax's core in it, whose
      subspaces are the ones to project on (after any refresh).

  Returns:
    A tree of ``grads``' structure: projected leaves hold ``R`` (float32,
    ``(*B, r, D)`` in the canonical layout of the parameter's state), the
    others their gradient, unchanged. It is linear in ``grads``.

  Raises:
    ValueError: A basis is not stored (``store_basis=False``), or the state
      holds more than one subspax core.
  """
  flat, treedef = jax.tree.flatten(grads, is_leaf=_is_masked)
  out = [g if s is None or _is_masked(g) else _project(g, s)
         for g, s in zip(flat, projected_states(grads, state))]
  return treedef.unflatten(out)


def update_from_reduced(tx: optax.GradientTransformation, reduced: Any,
                        state: Any, params: Any, **extra_args):
  """One step of ``tx`` from reduced gradients (:func:`reduce_gradients`).

  Equals ``tx.update`` of any full gradient with these reduced gradients
  (for methods whose update reads only them: no recovery, no scaled
  gradient). Never refreshes: refresh before, with
  :func:`refresh_subspaces`.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, subspax
    >>> tx = subspax.galore(1e-2, rank=2)
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
    >>> g = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size).reshape(p.shape)
    ...                                    * 1.0), params)
    >>> state = subspax.refresh_subspaces(tx, g, tx.init(params), params)
    >>> mine, _ = subspax.update_from_reduced(
    ...     tx, subspax.reduce_gradients(g, state), state, params)
    >>> whole, _ = tx.update(g, state, params, refresh=False)
    >>> bool(np.allclose(mine['w'], whole['w'], atol=1e-6))
    True

  Args:
    tx: The transformation.
    reduced: Reduced gradients, as :func:`reduce_gradients` returns them.
    state: ``tx``'s state.
    params: The parameters (the updates take their shapes and dtypes).
    **extra_args: More arguments of ``tx.update`` (``layer``).

  Returns:
    ``(updates, state)``, as ``tx.update``.
  """
  buffers, reduced = reduced_arguments(reduced, state, params)
  tx = optax.with_extra_args_support(tx)
  return tx.update(buffers, state, params, reduced=reduced, refresh=False,
                   **extra_args)


def reduced_arguments(reduced: Any, state: Any, shapes: Any):
  """``(buffers, reduced=)`` of the core's update for reduced gradients.

  Args:
    reduced: As :func:`reduce_gradients` returns.
    state: The transformation's state.
    shapes: The parameters (or shapes), in ``reduced``'s structure.

  Returns:
    ``buffers``: ``reduced`` with each projected leaf replaced by zeros of its
    parameter's shape and dtype (the update is written into them);
    ``reduced=``: the reduced gradients there, None elsewhere.
  """
  flat, treedef = jax.tree.flatten(reduced, is_leaf=_is_masked)
  sizes = jax.tree.leaves(shapes, is_leaf=_is_masked)
  buffers, given = [], []
  for r, p, s in zip(flat, sizes, projected_states(reduced, state)):
    if s is None or _is_masked(r):
      buffers.append(r)
      given.append(None)
    else:
      buffers.append(jnp.zeros(p.shape, p.dtype))
      given.append(r)
  return treedef.unflatten(buffers), treedef.unflatten(given)


def projected_states(tree: Any, state: Any) -> list:
  """The ``ProjectedState`` of each leaf of ``tree`` (None if not projected).

  ``tree`` has the parameters' structure (``MaskedNode`` leaves count).
  """
  cores = [x for x in jax.tree.leaves(state, is_leaf=_is_core)
           if isinstance(x, _state_types.SubspaceAdamState)]
  size = len(jax.tree.leaves(tree, is_leaf=_is_masked))
  if not cores:
    return [None] * size
  if len(cores) > 1:
    raise ValueError("The state holds more than one subspax core; reduced "
                     "gradients need one projection per parameter.")
  states = jax.tree.leaves(
      cores[0].matrices,
      is_leaf=lambda x: isinstance(x, (_state_types.ProjectedState, MaskedNode)))
  if len(states) != size:
    raise ValueError("The gradients do not have the structure of the state's "
                     "parameters.")
  return [s if isinstance(s, _state_types.ProjectedState) else None for s in states]


def _project(g: jax.Array, state: _state_types.ProjectedState) -> jax.Array:
  """``R`` of every matrix of one parameter, ``(*B, r, D)`` float32."""
  layout = state.layout
  if _is_masked(state.basis):
    raise ValueError("Reduced gradients need stored bases; this parameter's "
                     "is regenerated from the key (store_basis=False).")
  nb, num = len(layout.batch_shape), layout.num_matrices
  stack = layout.to_matrices(g, dtype=g.dtype)
  bases = jax.tree.map(lambda a: a.reshape((num,) + a.shape[nb:]), state.basis)

  def one(i):
    basis = _stored_basis.load(jax.tree.map(lambda a: a[i], bases))
    return _blocks.StackedMatrix(stack, i, basis, layout.rank,
                                 layout.side == "right").project()

  reduced = jax.lax.map(one, jnp.arange(num))
  return reduced.reshape(layout.batched(layout.rank, layout.D))


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _is_core(x) -> bool:
  return isinstance(x, (_state_types.SubspaceAdamState, MaskedNode))

"""Where the random keys of subspax's subspaces come from.

A transformation holds one base key. The subspace of matrix ``i`` of projected
parameter ``j`` in refresh epoch ``e`` (steps ``[e T, (e + 1) T)``) is drawn
with the key

  ``fold_in(fold_in(fold_in(base_key, j), i), e)``

* ``j``, the parameter's *leaf index*: its position among the projected
  parameters in ``jax.tree.flatten`` order of the parameter tree (dict keys
  sorted, sequences in order), the parameters that are not projected skipped;
* ``i``: the matrix's position in the row-major order of a stacked
  ``(..., m, n)`` parameter's leading axes;
* ``e = count // T`` (plus an offset for a neighbouring epoch).

``fold_in`` gives the same keys on every host and under any sharding. The
optimizer core (:mod:`subspax._core`) and the subspace layers refreshed outside
it (:mod:`subspax.reparam`) both derive their keys here, so a layer gets the
basis the transformation would pick for the same parameter and step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp


def key_data(key: int | jax.Array) -> jax.Array:
  """The raw data of a base key, as a transformation's state stores it.

  Examples:
    >>> import jax
    >>> from subspax import _keys
    >>> (_keys.key_data(0) == _keys.key_data(jax.random.key(0))).all()
    Array(True, dtype=bool)

  Args:
    key: A typed ``jax.random.key`` or an int seed.

  Returns:
    ``jax.random.key_data`` of the key: ``(2,)`` uint32 for the default PRNG.
  """
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jax.random.key_data(jax.random.key(key))


def parameter_key(base_key: jax.Array, leaf_index: int | jax.Array
                  ) -> jax.Array:
  """The key of the projected parameter with this leaf index."""
  return jax.random.fold_in(base_key, leaf_index)


def matrix_keys(key: jax.Array, num: int, offset: int | jax.Array = 0
                ) -> jax.Array:
  """The keys of ``num`` stacked matrices of a parameter, shape ``(num,)``.

  ``offset`` is the position of the first of them in the whole stack (non-zero
  when one layer of a stacked parameter is updated on its own,
  :func:`subspax.layerwise`).
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(
      offset + jnp.arange(num))


def epoch_key(matrix_key: jax.Array, count: jax.Array, update_interval: int,
              offset: int = 0) -> jax.Array:
  """The key of the subspace in use at step ``count`` (``offset`` epochs on)."""
  return jax.random.fold_in(matrix_key, count // update_interval + offset)


def leaf_index(tree: Any, path: Sequence[Any], *,
               is_leaf: Optional[Callable[[Any], bool]] = None) -> int:
  """The leaf index of the leaf at ``path``: its position in ``tree``'s leaves.

  ``tree`` holds the projected parameters only (or leaves that flatten to
  nothing, such as ``optax.MaskedNode``, in place of the others), in the
  layout of the parameter tree: the rule the core applies to the tree it
  receives.

  Args:
    tree: A pytree.
    path: A key path of ``tree`` (``jax.tree_util`` keys).
    is_leaf: As in ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The position of ``path`` in ``jax.tree.flatten`` order.
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_leaf)[0]]
  return paths.index(tuple(path))

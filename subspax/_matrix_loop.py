"""The per-matrix loop: every matrix of one projected parameter, in turn.

A projected parameter is a stack of matrices (``(*B, m, n)``, e.g. scanned
layers); the loop refreshes each one when the step refreshes
(:mod:`subspax._transitions`) and writes its update over its gradient
(:mod:`subspax._outputs`), one matrix and one row block at a time, so the
workspace is one block's. The ordering guarantees it needs are
:mod:`subspax.ordering`'s (read first, allocate late).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from subspax import _blocks
from subspax import _core_config
from subspax import _keys
from subspax import _outputs
from subspax import _state_types
from subspax import _stored_basis
from subspax import _transitions
from subspax import ordering


def update_parameter(config: _core_config.Config, g: jax.Array,
                     state: _state_types.ProjectedState, count: jax.Array,
                     key: jax.Array, *, layer: Optional[jax.Array] = None,
                     refresh: Optional[bool] = None, refresh_only: bool = False,
                     reduced: Optional[jax.Array] = None):
  """Updates every matrix of one projected parameter.

  Memory: nothing full-size is added beyond the output. The matrices are
  updated one at a time in a loop whose carry is the gradient itself
  (overwritten with the update, so XLA can write it into a donated buffer),
  and each matrix is read and written in row blocks (:mod:`subspax._blocks`).
  A refresh step refreshes each matrix in the same loop, just before its
  update (a ``lax.cond`` per matrix): its workspace is one matrix's too, the
  gradient is read only through the loop (a cond that took the whole gradient
  as an operand makes XLA copy it before the in-place loop), and CPU LAPACK
  calls are not batched (batched ones can deadlock jaxlib 0.10's CPU runtime
  with many devices).

  ``layer``: ``g`` and ``state`` are the slice ``[layer:layer + 1]`` of a
  stacked parameter (the keys are those of its matrices in the stack).
  ``refresh``: whether this step refreshes, if known when tracing (else
  decided from ``count`` by a conditional per matrix). ``refresh_only``:
  refresh, take no step, return ``g`` unchanged. ``reduced``: the reduced
  gradients ``(*B, r, D)`` used instead of projecting ``g`` (the core's
  ``update_fn`` describes both).
  """
  layout = state.layout
  nb = len(layout.batch_shape)
  num = layout.num_matrices
  right = layout.side == "right"
  flat_fields = jax.tree.map(lambda a: a.reshape((num,) + a.shape[nb:]),
                             state)
  # One layer of a stack (`layer` given): its matrices' keys in the stack.
  keys = _keys.matrix_keys(key, num, 0 if layer is None else layer * num)
  stack = layout.to_matrices(g, dtype=g.dtype)  # (num, m, n), a view
  if reduced is not None:
    reduced = reduced.reshape((num,) + reduced.shape[nb:])

  refreshing = count % config.update_interval == 0

  def update_one(i, carry):
    stack, fields = carry
    fields_i = _materialized(jax.tree.map(lambda a: a[i], fields), count,
                             num, always=config.quantize_moments != "off")
    # `fields_i.basis` stays as stored (a narrower dtype, 8 bits): a step
    # that does not refresh writes it back untouched; it is used in float32.

    def refresh_matrix(fields_i):
      # Made canonical (transposed for side "right") one matrix at a time:
      # the buffers of both branches of a cond are allocated on every step.
      canonical = (stack[i].T if right else stack[i]).astype(jnp.float32)
      return _transitions.refresh_matrix(config, canonical, fields_i, keys[i],
                                         count=count, right=right)

    if refresh is None:
      fields_i = jax.lax.cond(refreshing, refresh_matrix, lambda f: f, fields_i)
    elif refresh:
      fields_i = refresh_matrix(fields_i)
    if refresh_only:
      return stack, _write_index(fields, fields_i, i)
    if config.stores_basis:
      basis = _stored_basis.load(fields_i.basis)
    else:
      basis = config.policy.sample(config.epoch_key(keys[i], count),
                                   layout.d, layout.rank)
    matrix = _blocks.StackedMatrix(
        stack, i, basis, layout.rank, right, zero=ordering.allocate_late(count),
        reduced=None if reduced is None else reduced[i])
    stack, new_state = _outputs.update_matrix(config, matrix, fields_i,
                                              count=count)
    return stack, _write_index(fields, new_state, i)

  stack, new_fields = jax.lax.fori_loop(0, num, update_one,
                                        (stack, flat_fields))
  new_state = jax.tree.map(lambda a, old: a.reshape(old.shape), new_fields,
                           state)
  return layout.from_matrices(stack, g.dtype), new_state


def _write_index(stacked, values, i):
  """Writes ``values`` (a per-matrix tree) at index ``i`` of ``stacked``."""
  return jax.tree.map(
      lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i,
                                                       0), stacked, values)


def _materialized(tree, count: jax.Array, num: int, always: bool = False):
  """``tree`` (a matrix's state, sliced out of the stacked state), read first.

  The matrix loop writes each matrix's new state back into the stacked state
  in place; unless its old slices are read first (`ordering.read_first`), XLA
  fuses some reads into computations that run after the write and copies
  every whole stack. A single matrix (``num == 1``, the loop is removed) needs
  no such thing, unless ``always``: 8-bit moments are decoded by table
  lookups that XLA would otherwise hoist, for every parameter, to the start
  of the update (the read is ordered after ``count``, which comes after the
  previous parameter).
  """
  if num == 1 and not always:
    return tree
  return ordering.read_first(tree, count)


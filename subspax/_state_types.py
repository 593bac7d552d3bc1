"""The core's state types, and the hook that lets flax serialize them.

:class:`ProjectedState` holds one projected parameter's basis and reduced
moments; :class:`SubspaceAdamState` the projected half of
:func:`~subspax.scale_by_subspace_adam` (one count, one key, a
``ProjectedState`` per projected parameter). Importing this module registers
``ProjectedState`` with ``flax.serialization`` when flax is installed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import optax

from subspax import _layout


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["basis", "mu", "nu", "age", "last_norm", "displacement"],
    meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class ProjectedState:
  """Optimizer state of one projected parameter (all its stacked matrices).

  Shapes use the canonical layout of :class:`~subspax.MatrixLayout`: ``*B`` is
  the parameter's batch shape, ``d`` the projected and ``D`` the kept side.

  Attributes:
    basis: The subspace, a ``DenseBasis`` (``s``: ``(*B, d, r)``, float32) or
      a ``RowBasis`` (``index``, ``scale``: ``(*B, r)``); ``MaskedNode`` when
      the basis is regenerated from the key (``store_basis=False``).
    mu: First moment, ``(*B, r, D)``, ``mu_dtype`` (float32 by default), or
      a signed ``QuantizedArray`` with ``quantize_moments`` on.
    nu: Second moment, ``(*B, r, D)``, ``nu_dtype`` (float32 by default), or
      an unsigned ``QuantizedArray`` (of ``sqrt(nu)``, rounded up).
    age: Steps accumulated in the moments since their last reset, int32:
      ``(*B,)`` for ``moments="reset"``, ``(*B, r)`` per row for
      ``"overlap"``; ``MaskedNode`` otherwise (the global count is used).
    last_norm: ``||Lambda||_F`` of the last recovery term, ``(*B,)`` float32;
      ``MaskedNode`` when recovery is off.
    displacement: RSO's proximal state ``B``, the reduced displacement of the
      parameter since the last refresh, ``(*B, r, D)`` float32 (zero after
      every refresh); ``MaskedNode`` when ``prox`` is None.
    layout: Static: how the parameter maps to canonical matrices.

  The core's loop over the stacked matrices works on one matrix at a time
  through the same record: the fields sliced to that matrix (no ``*B``), the
  layout unchanged.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> state = subspax.scale_by_galore(rank=2).init({'w': jnp.zeros((8, 16))})
    >>> leaf = state.inner_states['subspace'].inner_state.matrices['w']
    >>> leaf.basis.s.shape, leaf.mu.shape, leaf.layout.side
    ((8, 2), (2, 16), 'left')
  """

  basis: Any
  mu: jax.Array
  nu: jax.Array
  age: Any
  last_norm: Any
  displacement: Any
  layout: _layout.MatrixLayout

  # subspax.layerwise's protocol: the update skips (returns unchanged) a
  # parameter whose update is MaskedNode, and still counts its leaf index.
  skips_masked_updates = True

  def replace(self, **changes) -> ProjectedState:
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **changes)


class SubspaceAdamState(NamedTuple):
  """State of the projected part of :func:`scale_by_subspace_adam`.

  One step count and one key serve every projected parameter; each one's
  basis and moments are a :class:`ProjectedState` in ``matrices``.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> state = subspax.scale_by_grass(rank=2).init({'w': jnp.zeros((8, 16))})
    >>> inner = state.inner_states['subspace'].inner_state
    >>> int(inner.count), inner.key.shape, type(inner.matrices['w']).__name__
    (0, (2,), 'ProjectedState')

  Attributes:
    count: Steps taken, shape ``()``, int32.
    key: Raw PRNG key data, shape ``(2,)``, uint32 (checkpointable).
    matrices: A ``ProjectedState`` per projected leaf, ``MaskedNode`` for the
      others.
  """

  count: jax.Array
  key: jax.Array
  matrices: optax.Params



def _register_flax_serialization() -> None:
  """Lets ``flax.serialization`` (msgpack, state dicts) save ProjectedState.

  Only the array fields are saved; the static ``layout`` comes from the
  target state on restore, as for any pytree's structure. Skipped when flax
  is not installed (subspax does not depend on it).
  """
  try:
    from flax import serialization  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fields = [f.name for f in dataclasses.fields(ProjectedState)
            if f.name != "layout"]

  def to_state_dict(state):
    return {f: serialization.to_state_dict(getattr(state, f)) for f in fields}

  def from_state_dict(target, state_dict):
    return dataclasses.replace(target, **{
        f: serialization.from_state_dict(getattr(target, f), state_dict[f],
                                         name=f) for f in fields})

  serialization.register_serialization_state(ProjectedState, to_state_dict,
                                             from_state_dict)



_register_flax_serialization()

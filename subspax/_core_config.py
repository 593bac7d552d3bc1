"""The settings record every part of the core reads.

:func:`~subspax.scale_by_subspace_adam` checks its options and records them
in one frozen :class:`Config`; the reduced Adam step, the moment transitions,
recovery and the output modes read their fields from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from subspax import _keys
from subspax import _policies


@dataclasses.dataclass(frozen=True)
class Config:
  """The static and numeric settings of one core transformation
  (:func:`~subspax.scale_by_subspace_adam`'s options, checked)."""

  policy: _policies.SubspacePolicy
  rank: int
  update_interval: int
  b1: Any
  b2: Any
  eps: Any
  scale: Any
  moments: str
  recovery: bool
  recovery_limit: Any
  store_basis: bool
  mu_dtype: Any
  nu_dtype: Any
  output: str = "back"
  scale_type: str = "channel"
  limiter: str = "corrected"
  prox: Any = None
  prox_learning_rate: Any = 1.0
  quantize_moments: str = "off"
  basis_dtype: Any = jnp.float32

  @property
  def uses_prox(self) -> bool:
    """Whether RSO's proximal term (and its displacement state) is on.

    Decided by ``prox is not None``, never by its value: under
    ``optax.inject_hyperparams`` a number becomes a traced array, and the
    state must have the same fields with and without the wrapper.
    """
    return self.prox is not None

  @property
  def stores_basis(self) -> bool:
    return self.store_basis or not self.policy.key_only

  def epoch_key(self, key: jax.Array, count: jax.Array,
                offset: int = 0) -> jax.Array:
    """The key of the subspace in use at step ``count`` (``offset`` epochs on)."""
    return _keys.epoch_key(key, count, self.update_interval, offset)

  @property
  def tracks_norm(self) -> bool:
    """Whether a norm-growth limiter needs the last term's norm."""
    return self.limiter != "off" and (
        self.recovery or self.output == "scaled_gradient")


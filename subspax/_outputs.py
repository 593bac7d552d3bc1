"""The output modes: one matrix's update, written over its gradient.

``output="back"``: ``scale * back(N)``, plus Fira's recovery term when
``recovery`` is on; ``output="scaled_gradient"`` (APOLLO): the raw gradient
scaled along its kept side, ``scale * G diag(s)``, with no back-projection
(docs/algorithms.md sections 2 and 4). Each reads the reduced Adam step's
direction ``N`` and writes through :class:`subspax._blocks.StackedMatrix`.

References:
  Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
  Chen et al., Fira, https://arxiv.org/abs/2410.01623;
  Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subspax import _blocks
from subspax import _core_config
from subspax import _recovery
from subspax import _reduced_adam
from subspax import _state_types


def update_matrix(config: _core_config.Config, matrix: _blocks.StackedMatrix,
                  state: _state_types.ProjectedState, *, count: jax.Array):
  """One reduced-space Adam step on one matrix, written over its gradient.

  Returns:
    ``(stack, state)``: the stack with this matrix's gradient replaced by its
    update, and the matrix's new state (``basis`` untouched).
  """
  reduced = matrix.project()
  normalized, steps, state = _reduced_adam.adam_step(config, reduced, state,
                                                     count=count)
  if config.output == "scaled_gradient":
    kept, last_norm = _scaled_gradient(config, matrix, reduced, normalized,
                                       state.last_norm, steps)
    return matrix.write_update(None, kept), state.replace(last_norm=last_norm)
  direction = config.scale * normalized
  if not config.recovery:
    return matrix.write_update(direction), state
  phi, last_norm = _recovery.recovery_scales(config, matrix, reduced,
                                             normalized, state.last_norm, steps)
  stack = matrix.write_update(direction, phi, residual_of=reduced)
  return stack, state.replace(last_norm=last_norm)


def _scaled_gradient(config: _core_config.Config, matrix, reduced, normalized,
                     last_norm, steps):
  """APOLLO's update ``scale * f * G diag(s)`` of one matrix.

  ``s`` (:func:`subspax._recovery.kept_scales`) scales the kept side of ``G``; ``f`` is the
  norm-growth limiter's factor for ``||G diag(s)||_F``, computed from the
  kept side's norms, so no ``m x n`` buffer besides the output.

  Returns:
    ``(scale * f * s, new_last_norm)``.
  """
  s = _recovery.kept_scales(config, reduced, normalized)
  norm = jnp.sqrt(jnp.sum(jnp.square(s) * matrix.kept_sq_norms()))
  factor, last_norm = _recovery.limit_growth(config, norm, last_norm, steps)
  return config.scale * factor * s, last_norm


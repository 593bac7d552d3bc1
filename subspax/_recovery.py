"""Recovery scaling and the norm-growth limiter.

Fira's recovery adds the residual ``G - back(R)``, scaled per kept column by
``phi_j = ||N_j|| / (||R_j|| + 1e-8)``, to the update; the limiter lets the
norm of that term (or of APOLLO's scaled gradient) grow at most
``recovery_limit`` times per step (docs/algorithms.md section 4).

References:
  Chen et al., Fira, https://arxiv.org/abs/2410.01623;
  Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subspax import _core_config
from subspax import _reduced_adam


def recovery_scales(config: _core_config.Config, matrix, reduced, normalized,
                    last_norm, steps):
  """Fira recovery scaling with the norm-growth limiter.

  ``Lambda = (G - back(R)) diag(phi)``, ``phi_j = ||N_j|| / (||R_j|| + 1e-8)``,
  limited so that ``||Lambda||`` grows by at most ``recovery_limit`` per step.
  ``||Lambda||_F`` is computed from the residual itself, one row block at a
  time (no full-size buffer, no cancellation).

  Returns:
    ``(f phi, ||f Lambda||)``: the limited scales and the new ``last_norm``.
  """
  phi = kept_scales(config, reduced, normalized)
  norm = jnp.sqrt(matrix.residual_sq_norm(reduced, phi))
  factor, last_norm = limit_growth(config, norm, last_norm, steps)
  return factor * phi, last_norm


def kept_scales(config: _core_config.Config, reduced, normalized) -> jax.Array:
  """``s_j = ||N_j|| / (||R_j|| + 1e-8)`` per kept column, ``(D,)``.

  ``scale_type="tensor"`` uses one ratio of Frobenius norms for every column.
  """
  if config.scale_type == "tensor":
    ratio = jnp.linalg.norm(normalized) / (jnp.linalg.norm(reduced) + 1e-8)
    return jnp.full(reduced.shape[-1:], ratio)
  return jnp.linalg.norm(normalized, axis=0) / (
      jnp.linalg.norm(reduced, axis=0) + 1e-8)


def limit_growth(config: _core_config.Config, norm, last_norm, steps):
  """The norm-growth limiter: ``norm`` may grow ``recovery_limit``x per step.

  Args:
    config: ``limiter`` selects the convention (see
      :func:`scale_by_subspace_adam`).
    norm: Frobenius norm of this step's (bias-corrected) term.
    last_norm: The value this returned at the previous step (0 at first).
    steps: Adam's step count ``t`` of the moments (for ``"uncorrected"``).

  Returns:
    ``(factor, new_last_norm)``: multiply the term by ``factor``.
  """
  if config.limiter == "off":
    return jnp.ones_like(norm), last_norm
  if config.limiter == "uncorrected":
    # The authors limit mu / (sqrt(nu) + eps) before Adam's bias correction.
    norm = _reduced_adam.before_bias_correction(config, norm, steps)
  limit = config.recovery_limit * last_norm
  too_big = (last_norm > 0) & (norm > limit)
  factor = jnp.where(too_big, limit / jnp.where(norm > 0, norm, 1.0), 1.0)
  return factor, norm * factor


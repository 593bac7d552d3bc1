"""The reduced Adam step: Adam's moments on one matrix's projected gradient.

docs/algorithms.md section 2, step 2: ``mu``, ``nu`` on ``R`` (or on
``R + prox * B`` with RSO's proximal term), bias-corrected, and the normalized
direction ``N = mu_hat / (sqrt(nu_hat) + eps)``; 8-bit moments are decoded and
stored again here (:mod:`subspax._quantized`).

References:
  Kingma and Ba, Adam, https://arxiv.org/abs/1412.6980;
  Chen et al., RSO, https://arxiv.org/abs/2502.07222
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from subspax import _core_config
from subspax import _quantized
from subspax import _state_types
from subspax import ordering

MaskedNode = optax.MaskedNode


def adam_step(config: _core_config.Config, reduced: jax.Array,
              state: _state_types.ProjectedState, *, count: jax.Array):
  """Adam on one matrix's reduced gradient ``R`` (canonical ``(r, D)``).

  With RSO's proximal term, Adam sees ``R + prox * B`` and the displacement
  ``B`` moves by ``-lr(t) * scale * N`` (the parameter's own move).

  Returns:
    ``(N, steps, state)``: the normalized direction
    ``mu_hat / (sqrt(nu_hat) + eps)``, Adam's step count of the moments
    (per row for ``moments="overlap"``), and the state with the new moments.
  """
  if config.uses_prox:
    reduced = reduced + config.prox * state.displacement
  mu, nu = moments_step(config.b1, config.b2, reduced, state.mu, state.nu)
  age = state.age
  if isinstance(age, MaskedNode):
    steps = optax.safe_int32_increment(count)
  else:
    age = optax.safe_int32_increment(age)
    steps = age[:, None] if age.ndim else age
  normalized = normalized_step(config.b1, config.b2, config.eps, mu, nu, steps)
  moments = (_quantized.store(mu, state.mu, cast=False),
             _quantized.store(nu, state.nu, cast=False))
  if config.quantize_moments != "off":
    # Quantized whole, here: the parameter chain (``ordering.run_after``) reads one code,
    # which XLA could otherwise compute alone and leave the rest, with this
    # matrix's float32 moments, to the end of the update.
    moments = ordering.read_first(moments, count)
  state = state.replace(mu=moments[0], nu=moments[1], age=age)
  if config.uses_prox:
    lr = config.prox_learning_rate
    lr = lr(count) if callable(lr) else lr
    state = state.replace(displacement=state.displacement
                           - lr * config.scale * normalized)
  return normalized, steps, state


def moments_step(b1, b2, g: jax.Array, mu, nu) -> tuple[jax.Array, jax.Array]:
  """Adam's new moments, float32, from the stored ones (8-bit or plain)."""
  mu = b1 * _quantized.load(mu) + (1 - b1) * g
  nu = b2 * _quantized.load(nu) + (1 - b2) * jnp.square(g)
  return mu, nu


def normalized_step(b1, b2, eps, mu: jax.Array, nu: jax.Array,
                    steps: jax.Array) -> jax.Array:
  """``mu_hat / (sqrt(nu_hat) + eps)`` after ``steps`` steps (bias-corrected)."""
  mu_hat = mu / _bias_correction(b1, steps)
  nu_hat = nu / _bias_correction(b2, steps)
  return mu_hat / (jnp.sqrt(nu_hat) + eps)


def _bias_correction(decay, steps: jax.Array) -> jax.Array:
  """Adam's ``1 - decay**steps``, float32 whatever the dtype of ``decay``.

  Under ``jax_enable_x64`` a Python float raised to an int32 power is
  float64, which would make every quantity downstream float64: the reduced
  direction, the recovery scales, and the float32 accumulators of the
  row-block loops (:mod:`subspax._blocks`), whose carry must keep its type.
  """
  return (1 - decay**steps).astype(jnp.float32)


def before_bias_correction(config: _core_config.Config, value: jax.Array,
                           steps: jax.Array) -> jax.Array:
  """``value`` (a norm of a bias-corrected term) as it was before Adam's bias
  correction ``sqrt(1 - b2^t) / (1 - b1^t)``, at step count ``steps``."""
  return value * _bias_correction(config.b1, steps) / jnp.sqrt(
      _bias_correction(config.b2, steps))

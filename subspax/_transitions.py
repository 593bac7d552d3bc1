"""Moment transitions: what a refresh does to one matrix's state.

A refresh gives the matrix a new basis (its policy's ``next_basis``, or the
next epoch's key-only sample) and carries the Adam moments into it by the
moment policy (docs/algorithms.md section 3): ``keep``, ``reset`` (with the
bias correction restarted), ``rotate`` (LDAdam) or ``overlap`` (row selectors
keep the rows two selections share).

References:
  Robert et al., LDAdam (moment rotation), https://arxiv.org/abs/2410.16103;
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from subspax import _core_config
from subspax import _quantized
from subspax import _state_types
from subspax import _stored_basis


def refresh_matrix(config: _core_config.Config, g: jax.Array,
                   state: _state_types.ProjectedState, key: jax.Array, *,
                   count: jax.Array, right: bool = False
                   ) -> _state_types.ProjectedState:
  """New basis for one canonical matrix, and the moment policy applied.

  ``right`` tells that ``g`` is the transpose of the matrix as stored (for
  policies whose result depends on it, see ``refresh_oriented``). RSO's
  displacement restarts from zero. ``state.basis`` is the stored basis
  (:mod:`subspax._stored_basis`), and so is the one returned.
  """
  policy = config.policy
  r, d = state.mu.shape[0], g.shape[0]
  epoch_key = config.epoch_key(key, count)
  if config.stores_basis:
    old = _stored_basis.load(state.basis)
    stored = _stored_basis.store(
        policy.next_basis(old, g, epoch_key, r, first=count == 0, right=right),
        state.basis)
    new = _stored_basis.load(stored)  # the basis every later step will use
  else:
    old = policy.sample(config.epoch_key(key, count, offset=-1), d, r)
    new = policy.sample(epoch_key, d, r)
    stored = state.basis
  mu, nu, age = _transition(config.moments, old, new, state.mu, state.nu,
                            state.age)
  displacement = jax.tree.map(jnp.zeros_like, state.displacement)
  return state.replace(basis=stored, mu=mu, nu=nu, age=age,
                       displacement=displacement)


def _transition(moments: str, old, new, mu, nu, age):
  """Applies the moment policy at a basis change ``old -> new``."""
  if moments == "keep":
    return mu, nu, age
  if moments == "reset":
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return zeros(mu), zeros(nu), zeros(age)
  if moments == "overlap":
    return _carry_rows(old, new, mu, nu, age)
  return (*rotate(old, new, mu, nu), age)


def rotate(old, new, mu, nu):
  """``moments="rotate"`` (LDAdam): the moments in the coordinates of ``new``.

  ``C = new^T old`` maps reduced coordinates ``old -> new``; ``mu' = C mu``
  and ``nu' = |C^2 (nu - mu^2) + mu'^2|`` (docs/algorithms.md section 3).
  A rotation from a basis to itself leaves the moments as they are.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> from subspax import _transitions
    >>> basis = subspax.DenseBasis(jnp.eye(4)[:, :2])
    >>> mu, nu = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    >>> [float(x.sum()) for x in _transitions.rotate(basis, basis, mu, nu)]
    [6.0, 12.0]

  Args:
    old: The basis the moments are in (``DenseBasis``).
    new: The basis they move to.
    mu: First moment, ``(r, D)`` (or its ``QuantizedArray``).
    nu: Second moment, ``(r, D)`` (or its ``QuantizedArray``).

  Returns:
    ``(mu', nu')``, stored as ``mu`` and ``nu`` are. Columns are independent,
    so 8-bit moments are decoded, rotated and encoded a block of columns at
    a time (the float32 workspace is a block's, not the ``r x D`` moments').
  """
  c = new.gram(old)  # (r, r): reduced coordinates old -> new

  def rotate_columns(mu, nu):
    mu32, nu32 = _quantized.load(mu), _quantized.load(nu)
    new_mu = c @ mu32
    new_nu = jnp.abs(jnp.square(c) @ (nu32 - jnp.square(mu32))
                     + jnp.square(new_mu))
    return _quantized.store(new_mu, mu), _quantized.store(new_nu, nu)

  return _quantized.by_column_blocks(rotate_columns, mu, nu)


def _carry_rows(old, new, mu, nu, age):
  """``moments="overlap"``: each new slot takes one old slot of its row.

  A kept row changes scale from ``rho_old`` to ``rho_new``, so its ``mu`` is
  multiplied by ``rho_new / rho_old`` and its ``nu`` by the square. It is a
  gather (never a sum of slots, never ``0 * NaN`` from other rows); slots
  with no old row, or whose carried moments are not finite, start at zero.
  """
  source, ratio, found = new.overlap(old)
  new_mu = _quantized.load(mu)[source] * ratio[:, None]
  new_nu = _quantized.load(nu)[source] * jnp.square(ratio)[:, None]
  keep = found & jnp.all(jnp.isfinite(new_mu) & jnp.isfinite(new_nu), axis=1)
  new_mu = jnp.where(keep[:, None], new_mu, 0.0)
  new_nu = jnp.where(keep[:, None], new_nu, 0.0)
  new_age = jnp.where(keep, age[source], 0)
  return (_quantized.store(new_mu, mu), _quantized.store(new_nu, nu),
          new_age)


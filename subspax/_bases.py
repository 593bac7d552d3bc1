"""The two kinds of subspace a policy can hold, for one canonical matrix.

A basis maps a canonical gradient ``G`` of shape ``(d, D)`` to its reduced form
``R`` of shape ``(r, D)`` (:meth:`project`) and maps a reduced update back
(:meth:`back`). Every method of ALGORITHMS.md uses one of two kinds:

* :class:`DenseBasis`: an orthonormal (or Gaussian) ``d x r`` matrix ``S``:
  ``R = S^T G``, ``back(X) = S X`` (GaLore, SubTrack++, GrassWalk, GrassJump,
  RSO).
* :class:`RowBasis`: a structured row selector (GRASS): ``R`` holds ``r``
  scaled rows of ``G`` and ``back`` scatters them back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _column_sq_norms(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x), axis=0)


class DenseBasis(NamedTuple):
  """A dense basis ``S`` with orthonormal columns (for Gaussian RSO: not).

  Attributes:
    s: ``S``, shape ``(d, r)``, float32.
  """

  s: jax.Array  # shape=(d, r), float32

  @classmethod
  def zeros(cls, d: int, r: int) -> "DenseBasis":
    return cls(jnp.zeros((d, r), jnp.float32))

  def project(self, g: jax.Array) -> jax.Array:
    """``S^T G``: ``(d, D) -> (r, D)``."""
    return self.s.T @ g

  def back(self, x: jax.Array, d: int) -> jax.Array:
    """``S X``: ``(r, D) -> (d, D)``."""
    del d
    return self.s @ x

  def coords(self, x: jax.Array) -> jax.Array:
    """``x S``: activations ``(..., d) -> (..., r)`` (``project`` of ``x^T``)."""
    return x @ self.s.astype(x.dtype)

  def embed(self, h: jax.Array, d: int) -> jax.Array:
    """``h S^T``: ``(..., r) -> (..., d)`` (``back`` of ``h^T``, transposed)."""
    del d
    return h @ self.s.T.astype(h.dtype)

  def gram(self, old: "DenseBasis") -> jax.Array:
    """``C = S_new^T S_old`` (r x r), the change of reduced coordinates."""
    return self.s.T @ old.s

  def residual_sq_norm(self, g, r, phi) -> jax.Array:
    """``||(G - S S^T G) diag(phi)||_F^2`` without forming the residual.

    For orthonormal ``S`` the column norms split as
    ``||G_j||^2 = ||S^T G_j||^2 + ||residual_j||^2``.

    Args:
      g: ``G``, ``(d, D)``.
      r: ``S^T G``, ``(r, D)``.
      phi: Column scales, ``(D,)``.

    Returns:
      A float32 scalar.
    """
    residual = jnp.maximum(_column_sq_norms(g) - _column_sq_norms(r), 0.0)
    return jnp.sum(jnp.square(phi) * residual)


class RowBasis(NamedTuple):
  """A GRASS row selector: ``R = rho[:, None] * G[sigma]``.

  Attributes:
    index: Selected rows ``sigma``, shape ``(r,)``, int32.
    scale: Row scales ``rho``, shape ``(r,)``, float32.
  """

  index: jax.Array  # shape=(r,), int32
  scale: jax.Array  # shape=(r,), float32

  @classmethod
  def zeros(cls, d: int, r: int) -> "RowBasis":
    del d
    return cls(jnp.zeros((r,), jnp.int32), jnp.zeros((r,), jnp.float32))

  def project(self, g: jax.Array) -> jax.Array:
    """Gathers the selected rows, scaled: ``(d, D) -> (r, D)``."""
    return self.scale[:, None] * g[self.index]

  def back(self, x: jax.Array, d: int) -> jax.Array:
    """Scatters scaled rows into zeros: ``(r, D) -> (d, D)``."""
    out = jnp.zeros((d, x.shape[-1]), x.dtype)
    return out.at[self.index].add(self.scale[:, None] * x)

  def coords(self, x: jax.Array) -> jax.Array:
    """Gathers the selected columns, scaled: ``(..., d) -> (..., r)``."""
    return x[..., self.index] * self.scale.astype(x.dtype)

  def embed(self, h: jax.Array, d: int) -> jax.Array:
    """Scatters scaled columns into zeros: ``(..., r) -> (..., d)``."""
    out = jnp.zeros(h.shape[:-1] + (d,), h.dtype)
    return out.at[..., self.index].add(h * self.scale.astype(h.dtype))

  def overlap(self, old: "RowBasis"):
    """Where each slot's row was selected by ``old``, and the scale change.

    Args:
      old: The previous selection.

    Returns:
      ``(source, ratio, found)``, each ``(r,)``: the first old slot selecting
      the same row (int32; 0 when none), ``rho_new / rho_old`` (0 when none)
      and whether there is one (bool).
    """
    same = (self.index[:, None] == old.index[None, :]) & (old.scale != 0)
    found = jnp.any(same, axis=1)
    source = jnp.argmax(same, axis=1).astype(jnp.int32)
    old_scale = jnp.where(found, old.scale[source], 1.0)
    return source, jnp.where(found, self.scale / old_scale, 0.0), found

  def gram(self, old: "RowBasis") -> jax.Array:
    """``S_new^T S_old``: non-zero where both select the same row."""
    same_row = self.index[:, None] == old.index[None, :]
    return jnp.where(same_row, self.scale[:, None] * old.scale[None, :], 0.0)

  def residual_sq_norm(self, g, r, phi) -> jax.Array:
    """``||(G - back(R)) diag(phi)||_F^2`` (exact for any selection)."""
    residual = g - self.back(r, g.shape[0])
    return jnp.sum(jnp.square(residual * phi))

"""The two kinds of subspace a policy can hold, for one canonical matrix.

A basis maps a canonical gradient ``G`` of shape ``(d, D)`` to its reduced form
``R`` of shape ``(r, D)`` (:meth:`project`) and maps a reduced update back
(:meth:`back`). Every method of docs/algorithms.md (section 5) uses one of
two kinds:

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


class DenseBasis(NamedTuple):
  """A dense basis ``S`` with orthonormal columns (for Gaussian RSO: not).

  ``project`` maps a canonical ``(d, D)`` gradient to ``S^T G`` and ``back``
  maps a reduced ``(r, D)`` matrix to ``S X``; ``coords`` and ``embed`` apply
  the same maps to activations (the reparametrised layers of
  :mod:`subspax.reparam`).

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> basis = subspax.DenseBasis(jnp.eye(4, 2))  # spans e_1 and e_2
    >>> g = jnp.arange(12.0).reshape(4, 3)
    >>> basis.project(g).shape
    (2, 3)
    >>> basis.back(basis.project(g), 4)[2:].tolist()  # outside the span: 0
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]

  Attributes:
    s: ``S``, shape ``(d, r)``, float32.
  """

  s: jax.Array  # shape=(d, r), float32

  # The recovery residual G - back(S^T G) is the orthogonal complement's part.
  orthogonal_complement = True

  @classmethod
  def zeros(cls, d: int, r: int) -> "DenseBasis":
    return cls(jnp.zeros((d, r), jnp.float32))

  def rows(self, start, size: int) -> "DenseBasis":
    """The rows ``[start, start + size)`` of ``S``: acts on a row block."""
    return DenseBasis(jax.lax.dynamic_slice_in_dim(self.s, start, size))

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


class RowBasis(NamedTuple):
  """A GRASS row selector: ``R = rho[:, None] * G[sigma]``.

  ``project`` gathers ``r`` scaled rows of a canonical ``(d, D)`` gradient
  and ``back`` scatters scaled rows into zeros: the update touches only the
  selected rows. It stores ``2 r`` numbers instead of a ``d x r`` matrix.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> basis = subspax.RowBasis(index=jnp.array([3, 0]),
    ...                          scale=jnp.array([1.0, 2.0]))
    >>> g = jnp.arange(8.0).reshape(4, 2)
    >>> basis.project(g).tolist()  # row 3, then twice row 0
    [[6.0, 7.0], [0.0, 2.0]]
    >>> basis.back(basis.project(g), 4)[1:3].tolist()  # unselected rows: 0
    [[0.0, 0.0], [0.0, 0.0]]

  Attributes:
    index: Selected rows ``sigma``, shape ``(r,)``, int32.
    scale: Row scales ``rho``, shape ``(r,)``, float32.
  """

  index: jax.Array  # shape=(r,), int32
  scale: jax.Array  # shape=(r,), float32

  # With replacement, back(project(G)) is not G on the selected rows: the
  # recovery residual is G with the selected rows zeroed (docs/algorithms.md
  # section 5.6).
  orthogonal_complement = False

  @classmethod
  def zeros(cls, d: int, r: int) -> "RowBasis":
    del d
    return cls(jnp.zeros((r,), jnp.int32), jnp.zeros((r,), jnp.float32))

  def rows(self, start, size: int) -> "RowBasis":
    """The selector restricted to rows ``[start, start + size)``.

    Selections outside the block get scale 0 and point at the block's row 0,
    so ``project`` adds nothing for them and ``back`` writes zeros.
    """
    local = self.index - start
    inside = (local >= 0) & (local < size)
    return RowBasis(jnp.where(inside, local, 0),
                    jnp.where(inside, self.scale, 0.0))

  def selected(self, d: int) -> jax.Array:
    """Which of the ``d`` rows are selected, ``(d,)`` bool."""
    return jnp.zeros((d,), bool).at[self.index].set(True)

  def project(self, g: jax.Array) -> jax.Array:
    """Gathers the selected rows, scaled: ``(d, D) -> (r, D)``.

    A slot with scale 0 (outside a row block, see :meth:`rows`) gives zeros,
    also when the row it points at is not finite.
    """
    rows = g[self.index]
    return jnp.where(self.scale[:, None] != 0, self.scale[:, None] * rows, 0.0)

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

"""One matrix of a stacked gradient, read and overwritten block by block.

The core updates the matrices of a projected parameter one at a time, in a
loop that overwrites the gradient buffer with the update (the buffer XLA can
alias with a donated input). Inside that loop every full-size intermediate of
one matrix would still be a full-size temporary: ``S^T G`` needs ``G``'s slice
as an operand, ``S X + phi G`` a matmul output of ``m x n``. So each matrix is
itself processed in blocks of its stored rows, and the workspace is a block,
not a matrix.

Both sides are handled on the matrix as stored, ``(m, n)``:

* side ``"left"`` (the basis acts on the rows, ``d = m``): a row block is a
  block of the projected side; ``R = sum_b S_b^T G_b`` and the update's rows
  are ``S_b X``;
* side ``"right"`` (the basis acts on the columns, ``d = n``): a row block is
  a block of the kept side; its columns of ``R`` are ``(G_b S)^T`` and the
  update's rows are ``X_b^T S^T``.

The recovery residual ``G - back(R)`` is formed per block too, so its norm is
computed from the residual itself (the shortcut
``sum_j phi_j^2 (||G_j||^2 - ||R_j||^2)`` cancels catastrophically in float32
when ``G`` lies almost inside the subspace).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

# A matrix is split into at most this many row blocks ...
MAX_BLOCKS = 8
# ... of at least this many rows (smaller matrices are one block).
MIN_BLOCK_ROWS = 64


def num_row_blocks(rows: int) -> int:
  """How many equal row blocks the core splits a matrix of ``rows`` rows into.

  A projected matrix's update is computed one block of its stored rows at a
  time, so its workspace is one block (``rows / num_row_blocks(rows)`` rows),
  not the matrix: the smallest divisor of ``rows`` that gives blocks of at
  most ``rows / MAX_BLOCKS`` rows (and at least ``MIN_BLOCK_ROWS``); one
  block when no divisor up to ``8 * MAX_BLOCKS`` fits (a prime number of
  rows).

  Examples:
    >>> import subspax
    >>> subspax.num_row_blocks(4096), subspax.num_row_blocks(64)
    (8, 1)

  Args:
    rows: The rows of the matrix as stored (``m`` of an ``(m, n)`` matrix,
      whichever side is projected).

  Returns:
    The number of row blocks, a divisor of ``rows``.
  """
  want = max(1, min(MAX_BLOCKS, rows // MIN_BLOCK_ROWS))
  for k in range(want, 8 * MAX_BLOCKS + 1):
    if rows % k == 0:
      return k
  return 1


@dataclasses.dataclass(frozen=True)
class StackedMatrix:
  """Matrix ``index`` of a ``(num, m, n)`` stack, with its basis.

  Attributes:
    stack: The stacked gradients (later: updates), in their own dtype.
    index: Which matrix (a traced int32 scalar inside the core's loop).
    basis: The matrix's ``DenseBasis`` or ``RowBasis`` (canonical ``(d, r)``).
    rank: The subspace rank ``r``.
    right: Whether the basis acts on the columns (side ``"right"``).
    zero: A float32 zero computed where the matrix's turn comes (a traced
      scalar XLA cannot fold); accumulators start from it. A constant zero
      would let XLA fill every parameter's accumulators up front and keep
      them all alive for the whole update.
    reduced: The matrix's reduced gradient ``R`` (canonical ``(r, D)``,
      float32) when it is given rather than projected from the stack (the
      reduced gradients accumulated over micro-batches); None: projected.
  """

  stack: jax.Array
  index: Any
  basis: Any
  rank: int
  right: bool
  zero: Any = 0.0
  reduced: Any = None

  def _zeros(self, shape) -> jax.Array:
    return jnp.full(shape, self.zero, jnp.float32)

  @property
  def rows(self) -> int:
    return self.stack.shape[1]

  @property
  def cols(self) -> int:
    return self.stack.shape[2]

  @property
  def d(self) -> int:
    return self.cols if self.right else self.rows

  def _block_rows(self) -> int:
    return self.rows // num_row_blocks(self.rows)

  def _read(self, start, stack=None) -> jax.Array:
    """Row block ``[start, start + block)`` of the matrix, float32."""
    stack = self.stack if stack is None else stack
    block = jax.lax.dynamic_slice(stack, (self.index, start, 0),
                                  (1, self._block_rows(), self.cols))
    return block[0].astype(jnp.float32)

  def _for_each_block(self, body, init):
    """``lax.fori_loop`` over the row blocks: ``body(start, carry)``."""
    size = self._block_rows()
    return jax.lax.fori_loop(
        0, self.rows // size, lambda b, c: body(b * size, c), init)

  def _row_basis(self, start):
    """The basis restricted to the block's rows (side ``"left"`` only)."""
    return self.basis.rows(start, self._block_rows())

  def project(self) -> jax.Array:
    """The canonical reduced gradient ``R``, ``(r, D)``, float32."""
    if self.reduced is not None:
      return self.reduced
    r = self.rank

    if not self.right:
      def add_block(start, acc):
        return acc + self._row_basis(start).project(self._read(start))
      return self._for_each_block(
          add_block, self._zeros((r, self.cols)))

    def put_block(start, reduced):
      cols = self.basis.coords(self._read(start)).T  # (r, block)
      return jax.lax.dynamic_update_slice(reduced, cols, (0, start))
    return self._for_each_block(
        put_block, self._zeros((r, self.rows)))

  def _back(self, x: jax.Array, start) -> jax.Array:
    """The block's rows of ``back(x)`` (``x``: canonical ``(r, D)``)."""
    if not self.right:
      return self._row_basis(start).back(x, self._block_rows())
    x_block = jax.lax.dynamic_slice_in_dim(x, start, self._block_rows(), 1)
    return self.basis.embed(x_block.T, self.d)

  def _kept(self, scale: jax.Array, start) -> jax.Array:
    """The block's part of a kept-side scale ``(D,)``, broadcastable."""
    if not self.right:
      return scale
    return jax.lax.dynamic_slice_in_dim(scale, start, self._block_rows())[:, None]

  def _residual(self, g: jax.Array, reduced: jax.Array, start) -> jax.Array:
    """The block's rows of the recovery residual ``G - back(R)``."""
    if self.basis.orthogonal_complement:
      return g - self._back(reduced, start)
    # A row selector: the residual is G with its selected rows (left) or
    # columns (right) zeroed, also where a row was drawn twice.
    selected = self.basis.selected(self.d)
    if self.right:
      return jnp.where(selected[None, :], 0.0, g)
    selected = jax.lax.dynamic_slice_in_dim(selected, start,
                                            self._block_rows())
    return jnp.where(selected[:, None], 0.0, g)

  def residual_sq_norm(self, reduced: jax.Array, phi: jax.Array) -> jax.Array:
    """``||(G - back(R)) diag(phi)||_F^2``, from the residual itself."""
    def add_block(start, total):
      residual = self._residual(self._read(start), reduced, start)
      return total + jnp.sum(jnp.square(residual * self._kept(phi, start)))
    return self._for_each_block(add_block, self._zeros(()))

  def kept_sq_norms(self) -> jax.Array:
    """Squared norms of ``G`` along the kept side, ``(D,)``."""
    if not self.right:
      def add_block(start, acc):
        return acc + jnp.sum(jnp.square(self._read(start)), axis=0)
      return self._for_each_block(add_block,
                                  self._zeros((self.cols,)))

    def put_block(start, acc):
      norms = jnp.sum(jnp.square(self._read(start)), axis=1)
      return jax.lax.dynamic_update_slice_in_dim(acc, norms, start, 0)
    return self._for_each_block(put_block, self._zeros((self.rows,)))

  def write_update(self, x: Optional[jax.Array],
                   kept: Optional[jax.Array] = None,
                   residual_of: Optional[jax.Array] = None) -> jax.Array:
    """Overwrites the matrix with ``back(x) + G_kept diag(kept)``.

    Args:
      x: Canonical ``(r, D)`` direction to back-project, or None.
      kept: Kept-side scales ``(D,)`` of the gradient term, or None.
      residual_of: If given, the gradient term is the recovery residual
        ``G - back(residual_of)`` instead of ``G``.

    Returns:
      The stack with this matrix's rows replaced, in the stack's dtype.
    """
    if residual_of is not None and self.basis.orthogonal_complement:
      # back is linear: back(x) + (G - back(R)) k = back(x - R k) + G k.
      x = x - kept * residual_of
      residual_of = None

    def write_block(start, stack):
      out = 0.0
      if kept is not None:
        g = self._read(start, stack)  # the carry: no copy of the stack
        if residual_of is not None:
          g = self._residual(g, residual_of, start)
        out = g * self._kept(kept, start)
      if x is not None:
        out = out + self._back(x, start)
      out = out.astype(stack.dtype)[None]
      return jax.lax.dynamic_update_slice(stack, out, (self.index, start, 0))

    return self._for_each_block(write_block, self.stack)

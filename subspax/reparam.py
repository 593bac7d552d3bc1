"""Subspace-reparametrised linear layers: compute less, not only store less.

An optax transformation sees full ``m x n`` weight gradients, so it can shrink
Adam's moments but never the gradient buffer, the weight-gradient FLOPs, the
data-parallel all-reduce or the activations saved for the backward pass. These
functions move the subspace into the layer instead. A kernel ``W`` (``m x n``,
``y = x W``) is frozen between refreshes and gets a trainable reduced delta
``Delta`` of shape ``(r, D)`` in the canonical layout of ALGORITHMS.md section
0; the effective weight is ``W + back(Delta)``:

* side ``"left"`` (basis on the input dimension, ``d = m``):
  ``y = x W + coords(x) Delta``, so the weight gradient is
  ``dDelta = coords(x)^T dy`` (``2 N r n`` FLOPs instead of ``2 N m n``) and
  only ``coords(x)`` (``N x r``) is saved for it;
* side ``"right"`` (basis on the output dimension, ``d = n``):
  ``y = x W + embed(x Delta^T)``, ``dDelta = (x^T embed^T(dy))^T``.

``coords``/``embed`` are the basis applied to activations: ``x S`` / ``h S^T``
for a dense basis (RSO), a scaled column gather / scatter for a row selector
(GRASS). For a row selector the layer is a custom VJP that adds the delta's
rows into ``W`` before the one matmul, so only the weight gradient shrinks. At ``Delta = 0`` the gradient with respect to ``Delta`` is exactly
the reduced gradient ``project(G)`` the subspax transformations compute, so
Adam on ``Delta`` with its moments reset at every refresh is GRASS (reset
moments, ``alpha = 1``) or RSO; every ``T`` steps :func:`merge` folds
``Delta`` into ``W`` and a new basis is chosen.

References:
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660 (section 3);
  Chen et al., RSO, https://arxiv.org/abs/2502.07222 (Algorithm 1)
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp

from subspax import _bases
from subspax import _layout
from subspax import _validation

Basis = Union[_bases.DenseBasis, _bases.RowBasis]


def resolve_side(m: int, n: int, side: str = "auto") -> str:
  """The projected side of an ``m x n`` kernel (``"auto"``: the smaller one).

  Returns:
    ``"left"`` or ``"right"`` (ties go to ``"left"``, the input side).
  """
  _validation.choice("side", side, _layout.SIDES)
  if side == "auto":
    return "left" if m <= n else "right"
  return side


def delta_shape(m: int, n: int, rank: int, side: str) -> tuple[int, int]:
  """Shape ``(r, D)`` of the reduced delta of an ``m x n`` kernel."""
  return (rank, n) if resolve_side(m, n, side) == "left" else (rank, m)


def dense(x: jax.Array, kernel: jax.Array, delta: jax.Array, basis: Basis, *,
          side: str) -> jax.Array:
  """``x (sg(W) + back(Delta))``: a frozen kernel plus a trainable delta.

  The kernel is frozen (its gradient is zero); only ``delta`` and ``x`` get
  gradients. For a ``RowBasis`` (GRASS) the forward pass adds the ``r``
  scaled delta rows into ``W`` (no extra matmul) and the backward pass is a
  custom VJP: ``dx = dy (W + back(Delta))^T`` and ``dDelta`` from the ``r``
  selected input columns (side ``"left"``: ``coords(x)^T dy``, only ``N x r``
  saved) or output columns (``"right"``: ``coords(dy)^T x``), ``2 N r D``
  FLOPs in place of the ``2 N m n`` of a full weight gradient. For a
  ``DenseBasis`` (RSO) it is ``x W + (x S) Delta``, so only ``x S``
  (``N x r``) is saved for ``dDelta``.

  Args:
    x: Activations ``(..., m)``, in the compute dtype.
    kernel: ``W``, ``(m, n)``; cast to ``x.dtype``.
    delta: ``Delta``, ``(r, n)`` for side ``"left"``, ``(r, m)`` for
      ``"right"``; cast to ``x.dtype``.
    basis: One matrix's ``DenseBasis`` (``s``: ``(d, r)``) or ``RowBasis``.
    side: ``"left"``, ``"right"`` or ``"auto"`` (see :func:`resolve_side`).

  Returns:
    ``y``, ``(..., n)`` in ``x.dtype``.
  """
  m, n = kernel.shape
  side = resolve_side(m, n, side)
  kernel = jax.lax.stop_gradient(kernel).astype(x.dtype)
  delta = delta.astype(x.dtype)
  if isinstance(basis, _bases.RowBasis):
    return _row_linear(side, x, kernel, delta, basis.index, basis.scale)
  y = x @ kernel
  if side == "left":
    return y + basis.coords(x) @ delta
  return y + basis.embed(x @ delta.T, n)


def _with_rows(side: str, w: jax.Array, delta: jax.Array, index: jax.Array,
               scale: jax.Array) -> jax.Array:
  """``W + back(Delta)`` for a row selector: ``r`` scaled rows (or columns)."""
  rows = scale[:, None].astype(delta.dtype) * delta
  if side == "left":
    return w.at[index].add(rows)
  return w.at[:, index].add(rows.T)


def _contract(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T b`` over every leading axis: ``(..., p), (..., q) -> (p, q)``."""
  return jnp.einsum("...p,...q->pq", a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_linear(side, x, w, delta, index, scale):
  """GRASS's layer (Muhamed et al., section 3): ``x (W + back(Delta))`` whose
  backward pass computes only the ``r`` selected rows of the weight gradient.
  Every array is in the compute dtype; ``w`` gets a zero cotangent (frozen)."""
  return x @ _with_rows(side, w, delta, index, scale)


def _row_linear_fwd(side, x, w, delta, index, scale):
  y = x @ _with_rows(side, w, delta, index, scale)
  # What dDelta needs: the selected input columns (left) or all of x (right).
  saved = _bases.RowBasis(index, scale).coords(x) if side == "left" else x
  return y, (saved, w, delta, index, scale)


def _row_linear_bwd(side, residuals, dy):
  saved, w, delta, index, scale = residuals
  dx = dy @ _with_rows(side, w, delta, index, scale).T
  if side == "left":
    d_delta = _contract(saved, dy)
  else:
    d_delta = _contract(_bases.RowBasis(index, scale).coords(dy), saved)
  return (dx, jnp.zeros_like(w), d_delta.astype(delta.dtype), None,
          jnp.zeros_like(scale))


_row_linear.defvjp(_row_linear_fwd, _row_linear_bwd)


def merge(kernel: jax.Array, delta: jax.Array, basis: Basis, *,
          side: str) -> jax.Array:
  """Folds the delta into the kernel: ``W + back(Delta)``, in ``W``'s dtype.

  Args:
    kernel: ``W``, ``(m, n)``.
    delta: ``Delta``, ``(r, D)``.
    basis: The basis ``Delta`` was trained in.
    side: ``"left"`` or ``"right"``.

  Returns:
    The merged kernel, ``(m, n)``.
  """
  m, n = kernel.shape
  side = resolve_side(m, n, side)
  delta = delta.astype(jnp.float32)
  if side == "left":
    full = basis.back(delta, m)
  else:
    full = basis.back(delta, n).T
  return (kernel.astype(jnp.float32) + full).astype(kernel.dtype)


def canonical(g: jax.Array, side: str) -> jax.Array:
  """A full ``(m, n)`` kernel gradient in the canonical ``(d, D)`` layout."""
  m, n = g.shape
  return g if resolve_side(m, n, side) == "left" else g.T

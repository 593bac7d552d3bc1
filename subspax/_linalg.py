"""Small linear-algebra kernels the subspace policies share.

Everything works on one canonical matrix (no batch axis; the core vmaps) in
float32, with workspace ``O((d + D) r)`` unless the name says SVD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Re-orthonormalise a tracked basis when ||S^T S - I||_max exceeds this.
ORTHONORMALITY_TOLERANCE = 1e-4


def _sign_fixed_qr(x: jax.Array) -> jax.Array:
  """Thin QR whose ``R`` has a non-negative diagonal (a unique ``Q``)."""
  q, r = jnp.linalg.qr(x)
  signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
  return q * signs[None, :]


def haar_basis(key: jax.Array, d: int, r: int) -> jax.Array:
  """A Haar-distributed point of the Stiefel manifold, ``(d, r)``.

  Args:
    key: A PRNG key.
    d: Ambient dimension.
    r: Number of orthonormal columns.

  Returns:
    ``Q`` of the sign-fixed thin QR of a standard Gaussian ``d x r`` matrix,
    which makes the map exactly Haar (Mezzadri 2007).
  """
  return _sign_fixed_qr(jax.random.normal(key, (d, r), jnp.float32))


def exact_top_subspace(g: jax.Array, r: int, transposed: bool = False
                       ) -> jax.Array:
  """Top-``r`` left singular vectors of ``g`` by a full (reduced) SVD.

  Args:
    g: ``(d, D)`` float32.
    r: Rank.
    transposed: Take them as the top-``r`` rows of ``vh`` of the SVD of
      ``g^T`` instead (the same subspace; the signs of the columns are those
      an SVD of ``g^T`` gives).

  Returns:
    ``(d, r)`` orthonormal columns.
  """
  if transposed:
    _, _, vh = jnp.linalg.svd(g.T, full_matrices=False)
    return vh[:r].T
  u, _, _ = jnp.linalg.svd(g, full_matrices=False)
  return u[:, :r]


def align_signs(s: jax.Array, old: jax.Array) -> jax.Array:
  """Flips the columns of ``s`` so that ``diag(s^T old) >= 0``.

  Args:
    s: ``(d, r)`` new basis.
    old: ``(d, r)`` previous basis (all zeros at the first refresh: nothing
      is flipped).

  Returns:
    ``s`` with some columns negated (the same subspace).
  """
  overlap = jnp.sum(s * old, axis=0)
  return s * jnp.where(overlap < 0, -1.0, 1.0).astype(s.dtype)[None, :]


def best_geodesic_angle(g: jax.Array, x: jax.Array, u: jax.Array
                        ) -> jax.Array:
  """The angle ``t*`` that minimises ``F`` along a rank-1 geodesic.

  Along the geodesic of :func:`geodesic_step` only the basis direction
  ``x = S v`` moves, ``x(t) = x cos t - u sin t`` with ``u`` orthogonal to
  ``span(S)``, so ``F(t) = ||G - S(t) S(t)^T G||_F^2`` changes only through
  the captured energy
  ``||G^T x(t)||^2 = a cos^2 t + b sin^2 t - 2 c sin t cos t``
  with ``a = ||G^T x||^2``, ``b = ||G^T u||^2``, ``c = x^T G G^T u``. That is
  ``(a + b) / 2 + rho cos(2 (t - t*))`` with ``t* = atan2(-2 c, a - b) / 2``,
  the top eigenvector of the 2 x 2 matrix ``[[a, c], [c, b]]``. Every angle
  ``eta t*`` with ``eta`` in ``[0, 1]`` keeps ``F`` at or below its value at
  ``t = 0``.

  Args:
    g: ``(d, D)`` gradient.
    x: ``(d,)`` unit vector in ``span(S)``.
    u: ``(d,)`` unit vector orthogonal to ``span(S)`` (or zero).

  Returns:
    ``t*`` in ``(-pi/2, pi/2]`` (scalar). Work: two ``D``-vectors.
  """
  gx, gu = g.T @ x, g.T @ u
  a, b, c = jnp.dot(gx, gx), jnp.dot(gu, gu), jnp.dot(gx, gu)
  return 0.5 * jnp.arctan2(-2.0 * c, a - b)


def randomized_top_subspace(g: jax.Array, r: int, key: jax.Array,
                            oversample: int = 8,
                            power_iters: int = 2) -> jax.Array:
  """Top-``r`` left singular subspace by a randomized range finder.

  Halko, Martinsson and Tropp (2011), algorithm 4.4 with ``power_iters``
  re-orthonormalised power iterations, then an exact SVD of the small
  ``(r + p) x D`` matrix ``Q^T G``.

  Args:
    g: ``(d, D)`` float32.
    r: Rank.
    key: PRNG key for the Gaussian test matrix.
    oversample: Extra columns ``p``.
    power_iters: Power iterations ``q``.

  Returns:
    ``(d, r)`` orthonormal columns. Workspace ``O((d + D)(r + p))``.
  """
  d, big_d = g.shape
  k = min(r + oversample, d, big_d)
  omega = jax.random.normal(key, (big_d, k), jnp.float32)
  q = _sign_fixed_qr(g @ omega)
  for _ in range(power_iters):
    q = _sign_fixed_qr(g @ (g.T @ q))
  u_small, _, _ = jnp.linalg.svd(q.T @ g, full_matrices=False)
  basis = q @ u_small[:, :r]
  if basis.shape[1] < r:  # r > min(d, D): pad with an orthogonal complement.
    pad = jax.random.normal(jax.random.fold_in(key, 1), (d, r - k))
    basis = _sign_fixed_qr(jnp.concatenate([basis, pad], axis=1))
  return basis


def top_singular_triplet(h: jax.Array):
  """Top singular triplet ``(u, sigma, v)`` of a tall ``(d, r)`` matrix.

  Computed from the ``r x r`` Gram matrix ``H^T H`` by ``eigh``, so the
  workspace is ``O(d r + r^2)``.

  Args:
    h: ``(d, r)`` float32.

  Returns:
    ``u`` ``(d,)`` (unit, or zero when ``sigma`` is 0), ``sigma`` scalar,
    ``v`` ``(r,)`` unit.
  """
  eigvals, eigvecs = jnp.linalg.eigh(h.T @ h)
  v = eigvecs[:, -1]
  sigma = jnp.sqrt(jnp.maximum(eigvals[-1], 0.0))
  hv = h @ v
  hv_norm = jnp.linalg.norm(hv)
  u = jnp.where(hv_norm > 0, hv / jnp.where(hv_norm > 0, hv_norm, 1.0), 0.0)
  return u, sigma, v


def geodesic_step(s: jax.Array, u: jax.Array, v: jax.Array,
                  theta: jax.Array) -> jax.Array:
  """Moves ``S`` by angle ``theta`` along the geodesic with velocity ``-u v^T``.

  The exponential map on the Grassmannian for a rank-1 tangent (Edelman,
  Arias and Smith 1998): ``S + (S v)(cos theta - 1) v^T - u sin theta v^T``.
  It rotates the basis direction ``S v`` towards ``-u`` (which is orthogonal to
  ``span(S)``) and keeps the columns orthonormal.

  Args:
    s: ``(d, r)`` orthonormal basis.
    u: ``(d,)`` unit vector orthogonal to ``span(S)``.
    v: ``(r,)`` unit vector.
    theta: Rotation angle (scalar).

  Returns:
    The new ``(d, r)`` basis, re-orthonormalised by a thin QR only if it
    drifted past :data:`ORTHONORMALITY_TOLERANCE`.
  """
  sv = s @ v
  moved = s + jnp.outer(sv * (jnp.cos(theta) - 1.0) - u * jnp.sin(theta), v)
  return reorthonormalize_if_needed(moved)


def orthonormality_error(s: jax.Array) -> jax.Array:
  """``||S^T S - I||_max``."""
  return jnp.max(jnp.abs(s.T @ s - jnp.eye(s.shape[1], dtype=s.dtype)))


def reorthonormalize_if_needed(s: jax.Array) -> jax.Array:
  """Thin QR of ``s``, only when its columns drifted from orthonormal."""
  return jax.lax.cond(orthonormality_error(s) > ORTHONORMALITY_TOLERANCE,
                      _sign_fixed_qr, lambda x: x, s)

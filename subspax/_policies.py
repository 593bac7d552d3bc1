"""Subspace policies: how each method chooses and moves its subspace.

A policy is a small frozen dataclass. The reduced-space Adam core
(:mod:`subspax._core`) calls it on one canonical float32 matrix ``G`` of shape
``(d, D)`` (the core vmaps over stacked matrices):

* ``initial(g, key, r)``: the basis at step 0;
* ``refresh(basis, g, key, r)``: the basis at a later refresh step;
* ``zeros(d, r)``: a placeholder basis of the right shapes for ``init``.

Policies never touch the Adam moments; the core applies the moment policy
(keep / reset / rotate) around every basis change. Math: docs/algorithms.md
section 5 (the policies) and section 3 (the moment transitions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import ClassVar

import jax
import jax.numpy as jnp

from subspax import _bases
from subspax import _linalg
from subspax import _types

GEODESIC_STEPS = typing.get_args(_types.GeodesicStep)
GEODESIC_TANGENTS = typing.get_args(_types.GeodesicTangent)
INITS = typing.get_args(_types.Init)
SELECTIONS = typing.get_args(_types.Selection)

# Largest rotation of one basis direction per refresh under step="normalized".
MAX_NORMALIZED_ANGLE = math.pi / 4

# Fraction of the best geodesic angle taken under step="optimal". Chosen by
# measurement (`python -m bench.subtrack_step`, bench/results/subtrack_step.md):
# in random drifting-gradient cases of three shapes, the undamped step gave
# the lowest error on the next interval's gradient of the dampings tried
# (0.25, 0.5, 0.75, 1).
OPTIMAL_DAMPING = 1.0

# The paper scripts' step size for the fixed-angle rules.
PAPER_ETA = 10.0


def _is_zero(value) -> bool:
  """True for a concrete zero (hyperparameters may arrive traced)."""
  return isinstance(value, (int, float)) and value == 0


class SubspacePolicy:
  """Base class of the subspace policies: how a subspace is chosen and moved.

  A policy sees one canonical float32 gradient ``G`` of shape ``(d, D)`` at
  a time (the core vmaps it over stacked matrices). A subclass implements
  :meth:`refresh` and may override :meth:`initial` (the basis at step 0,
  by default a refresh of zeros). Policies never touch the Adam moments.
  Write a policy as a frozen dataclass, so that it is hashable.

  Examples:
    >>> import dataclasses, jax.numpy as jnp, subspax
    >>> @dataclasses.dataclass(frozen=True)
    ... class LeadingAxes(subspax.SubspacePolicy):
    ...   '''Always the first r coordinate directions.'''
    ...   def refresh(self, basis, g, key, r):
    ...     return subspax.DenseBasis(jnp.eye(g.shape[0], r))
    >>> tx = subspax.scale_by_subspace_adam(LeadingAxes(), rank=2)
    >>> grads = {'w': jnp.ones((8, 16))}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates['w'][2:].tolist() == [[0.0] * 16] * 6  # rows 0, 1 only
    True

  Attributes:
    basis_type: The basis class, :class:`DenseBasis` or :class:`RowBasis`.
    key_only: Whether the basis is a function of the key alone, so that it
      can be regenerated instead of stored (``store_basis=False``).
    orthonormal: Whether the basis has orthonormal columns (recovery scaling
      needs it).
    distinct_initial: Whether :meth:`initial` differs from a refresh of the
      zero basis (the core then branches on the first step).
    moment_rules: The moment rules that suit this policy's bases (see
      ``scale_by_subspace_adam``'s ``moments``); the first is the default.
  """

  basis_type: ClassVar[type] = _bases.DenseBasis
  # True when the basis is a function of the key alone, so it can be
  # regenerated instead of stored.
  key_only: ClassVar[bool] = False
  # True when the basis has orthonormal columns (recovery scaling needs it).
  orthonormal: bool = True
  # True when `initial` is not a refresh of the zero basis.
  distinct_initial: ClassVar[bool] = False
  # The moment rules this policy's bases support, the default first.
  moment_rules: ClassVar[tuple[str, ...]] = ("keep", "reset", "rotate")

  def zeros(self, d: int, r: int):
    return self.basis_type.zeros(d, r)

  def initial(self, g: jax.Array, key: jax.Array, r: int):
    return self.refresh(self.zeros(g.shape[0], r), g, key, r)

  def refresh(self, basis, g: jax.Array, key: jax.Array, r: int):
    raise NotImplementedError

  def refresh_oriented(self, basis, g: jax.Array, key: jax.Array, r: int, *,
                       right: bool):
    """``refresh``, told whether ``g`` is the transpose of the stored matrix.

    The core calls this one. Only a policy whose result depends on the
    orientation of ``G`` (the signs of an SVD) overrides it.
    """
    del right
    return self.refresh(basis, g, key, r)

  def next_basis(self, basis, g: jax.Array, key: jax.Array, r: int, *,
                 first: jax.Array, right: bool = False):
    """The basis after a refresh step; ``basis`` itself if ``g`` is not finite.

    What the core (and :mod:`subspax.reparam`) calls at every refresh.

    Args:
      basis: The basis in use (zeros before the first refresh).
      g: The canonical float32 gradient ``(d, D)``.
      key: This matrix's key for this refresh.
      r: The rank.
      first: Whether this is the first refresh (a traced bool); only read
        when ``distinct_initial``.
      right: Whether ``g`` is the transpose of the matrix as stored.

    Returns:
      The new basis, of ``basis``'s type and shapes.
    """
    refresh = functools.partial(self.refresh_oriented, right=right)
    if self.distinct_initial:
      new = jax.lax.cond(first, lambda: self.initial(g, key, r),
                         lambda: refresh(basis, g, key, r))
    else:
      new = refresh(basis, g, key, r)
    finite = jnp.all(jnp.isfinite(g))
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, basis)


@dataclasses.dataclass(frozen=True)
class SvdSubspace(SubspacePolicy):
  """GaLore: the top-``r`` singular subspace of ``G`` (exact SVD).

  On side ``"left"`` the basis is the top-``r`` left singular vectors of ``G``;
  on side ``"right"`` the top-``r`` rows of ``vh`` of ``G`` as stored (as
  ``optax.contrib.galore`` does), not ``u`` of ``G^T``: the subspace is the
  same, but singular-vector signs differ and GaLore's kept moments see them.

  Attributes:
    align_signs: Flip each new basis column whose inner product with the old
      column is negative, so that ``diag(S_new^T S_old) >= 0``. SVD signs are
      arbitrary; a flip between refreshes negates that row of the kept first
      moment.

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> policy = subspax.SvdSubspace()
    >>> g = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> basis = policy.refresh(policy.zeros(3, 2), g, None, 2)
    >>> jnp.abs(basis.s).round(3).tolist()  # the two largest directions
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
  """

  align_signs: bool = False

  def refresh(self, basis, g, key, r):
    return self.refresh_oriented(basis, g, key, r, right=False)

  def refresh_oriented(self, basis, g, key, r, *, right):
    del key
    s = _linalg.exact_top_subspace(g, r, transposed=right)
    if self.align_signs:
      s = _linalg.align_signs(s, basis.s)
    return _bases.DenseBasis(s)


def _top_subspace(g, key, r, init):
  if init == "svd":
    return _linalg.exact_top_subspace(g, r)
  return _linalg.randomized_top_subspace(g, r, key)


@dataclasses.dataclass(frozen=True)
class GeodesicSubspace(SubspacePolicy):
  """One rank-1 geodesic step on the Grassmannian per refresh.

  With ``tangent="gradient"`` this is SubTrack++: the step descends the
  projection error ``F(S) = ||G - S S^T G||_F^2`` along the top singular
  direction of its Riemannian gradient ``H = -2 (G A^T - S A A^T)``,
  ``A = S^T G``. With ``tangent="random"`` it is GrassWalk: ``H`` is a Gaussian
  matrix projected onto the tangent space. ``jump_prob > 0`` gives the
  GrassWalk/GrassJump hybrid: each refresh jumps to a Haar-random subspace
  with that probability.

  Attributes:
    eta: Step size; its meaning depends on ``step``.
    step: ``"optimal"``: ``eta`` times the angle that minimises ``F`` along
      the geodesic (closed form; ``eta`` in ``[0, 1]`` is a damping factor,
      and no such step increases ``F``); ``"normalized"``: angle
      ``eta * sigma / ||G||_F^2`` capped at pi/4 (scale-free); ``"raw"``:
      ``eta * sigma`` (the paper's form); ``"angle"``: ``eta`` radians.
    tangent: ``"gradient"`` (SubTrack++) or ``"random"`` (GrassWalk).
    init: Initial basis: ``"randomized"`` range finder or exact ``"svd"``.
    jump_prob: Probability of a Haar jump at a refresh (hybrid).

  References:
    Rajabi et al., SubTrack++, https://arxiv.org/abs/2502.01586;
    Rajabi et al., GrassWalk/GrassJump, https://arxiv.org/abs/2510.01878;
    Edelman, Arias, Smith (1998), the Grassmannian geodesic.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> policy = subspax.GeodesicSubspace()  # SubTrack++'s optimal step
    >>> g = jax.random.normal(jax.random.key(0), (6, 10))
    >>> old = subspax.DenseBasis(jnp.eye(6, 2))
    >>> new = policy.refresh(old, g, jax.random.key(1), 2)
    >>> error = lambda b: jnp.linalg.norm(g - b.back(b.project(g), 6))
    >>> bool(error(new) <= error(old))  # a refresh never raises the error
    True
  """

  eta: float = OPTIMAL_DAMPING
  step: _types.GeodesicStep = "optimal"
  tangent: _types.GeodesicTangent = "gradient"
  init: _types.Init = "randomized"
  jump_prob: float = 0.0
  distinct_initial: ClassVar[bool] = True
  moment_rules: ClassVar[tuple[str, ...]] = ("rotate", "keep", "reset")

  def initial(self, g, key, r):
    return _bases.DenseBasis(_top_subspace(g, key, r, self.init))

  def tangent_direction(self, s, g, key):
    """The horizontal tangent ``H`` (``(d, r)``) at ``S``."""
    if self.tangent == "random":
      z = jax.random.normal(key, s.shape, jnp.float32)
      return z - s @ (s.T @ z)
    a = s.T @ g
    return -2.0 * (g @ a.T - s @ (a @ a.T))

  def angle(self, sigma, g, s=None, u=None, v=None):
    """The rotation angle of one refresh (``s, u, v`` for ``"optimal"``)."""
    if self.step == "optimal":
      return self.eta * _linalg.best_geodesic_angle(g, s @ v, u)
    if self.step == "angle":
      return jnp.asarray(self.eta, jnp.float32)
    if self.step == "raw":
      return self.eta * sigma
    g_sq = jnp.sum(jnp.square(g))
    theta = self.eta * sigma / jnp.where(g_sq > 0, g_sq, 1.0)
    return jnp.minimum(theta, MAX_NORMALIZED_ANGLE)

  def refresh(self, basis, g, key, r):
    s = basis.s
    u, sigma, v = _linalg.top_singular_triplet(
        self.tangent_direction(s, g, jax.random.fold_in(key, 0)))
    theta = jnp.where(sigma > 0, self.angle(sigma, g, s, u, v), 0.0)
    moved = _linalg.geodesic_step(s, u, v, theta)
    if not _is_zero(self.jump_prob):
      jump = jax.random.bernoulli(jax.random.fold_in(key, 1), self.jump_prob)
      moved = jax.lax.cond(
          jump, lambda: _linalg.haar_basis(jax.random.fold_in(key, 2),
                                           s.shape[0], r),
          lambda: moved)
    return _bases.DenseBasis(moved)


@dataclasses.dataclass(frozen=True)
class RandomSubspace(SubspacePolicy):
  """A fresh random subspace at every refresh (GrassJump, RSO).

  Attributes:
    orthonormal: Haar-random orthonormal ``S`` (default), or a Gaussian
      ``S`` with ``N(0, 1/r)`` entries (RSO's other choice, ``E[S S^T] = I``).

  References:
    Rajabi et al., GrassJump, https://arxiv.org/abs/2510.01878;
    Chen et al., RSO, https://arxiv.org/abs/2502.07222

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> basis = subspax.RandomSubspace().sample(jax.random.key(0), 6, 2)
    >>> bool(jnp.allclose(basis.s.T @ basis.s, jnp.eye(2), atol=1e-5))
    True
  """

  key_only: ClassVar[bool] = True
  moment_rules: ClassVar[tuple[str, ...]] = ("rotate", "keep", "reset")
  orthonormal: bool = True

  def refresh(self, basis, g, key, r):
    del basis
    return self.sample(key, g.shape[0], r)

  def sample(self, key, d, r):
    """The basis for ``key``; it needs no gradient (``store_basis=False``)."""
    if self.orthonormal:
      return _bases.DenseBasis(_linalg.haar_basis(key, d, r))
    return _bases.DenseBasis(
        jax.random.normal(key, (d, r), jnp.float32) / math.sqrt(r))


@dataclasses.dataclass(frozen=True)
class RowSubspace(SubspacePolicy):
  """GRASS: select ``r`` rows of ``G`` from its row norms.

  Attributes:
    selection: ``"topk"`` (largest norms, deterministic), ``"multinomial"``
      (probabilities proportional to the row norms) or ``"uniform"``.
    replacement: Sample with replacement (scales ``1/sqrt(r q_i)`` make the
      estimator unbiased) or without (Gumbel top-k, scales 1).

  References:
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> policy = subspax.RowSubspace(selection='topk')
    >>> g = jnp.arange(5.0)[:, None] * jnp.ones((5, 3))  # row norms grow
    >>> basis = policy.refresh(policy.zeros(5, 2), g, jax.random.key(0), 2)
    >>> sorted(basis.index.tolist())
    [3, 4]
  """

  basis_type: ClassVar[type] = _bases.RowBasis
  moment_rules: ClassVar[tuple[str, ...]] = ("reset", "overlap", "keep",
                                             "rotate")
  selection: _types.Selection = "multinomial"
  replacement: bool = False

  def refresh(self, basis, g, key, r):
    del basis
    d = g.shape[0]
    norms = jnp.linalg.norm(g, axis=1)
    if self.selection == "topk":
      return _bases.RowBasis(jax.lax.top_k(norms, r)[1].astype(jnp.int32),
                             jnp.ones((r,), jnp.float32))
    if self.selection == "uniform":
      probs = jnp.full((d,), 1.0 / d, jnp.float32)
    else:
      total = jnp.sum(norms)
      probs = jnp.where(total > 0, norms / jnp.where(total > 0, total, 1.0),
                        1.0 / d)
    log_probs = jnp.log(probs)
    if self.replacement:
      index = jax.random.categorical(key, log_probs, shape=(r,))
      scale = jax.lax.rsqrt(r * probs[index])
    else:
      gumbel = jax.random.gumbel(key, (d,), jnp.float32)
      index = jax.lax.top_k(log_probs + gumbel, r)[1]
      scale = jnp.ones((r,), jnp.float32)
    return _bases.RowBasis(index.astype(jnp.int32), scale)

"""A property kit: the closed-form checks every subspace policy must pass.

A researcher who writes a new :class:`~subspax.SubspacePolicy` (or a method
built on :func:`~subspax.scale_by_subspace_adam`) tests it in one line::

  import subspax.testing
  subspax.testing.check(MyPolicy())          # a policy
  subspax.testing.check(subspax.apollo)      # a method factory

Policy checks (docs/algorithms.md section 9), each over shapes drawn by
hypothesis:

* orthonormal bases stay orthonormal after many refreshes;
* ``back(project(.))`` is a projector that is exact inside the span (when the
  basis claims it: orthonormal columns, rows selected without replacement);
* unbiasedness ``E[c back(project(G))] = G`` when claimed (``unbiased_scale``);
* the ``rotate`` moment policy with ``C = S^T S = I`` is the identity.

Transformation checks, on a small tree (a left-side matrix, a right-side
matrix, a stack, a bias):

* non-finite gradients never reach the basis;
* jit and no-jit agree, and the update compiles once;
* parameter dtypes (float32, bfloat16) are kept and the state's structure,
  shapes and dtypes do not change across steps and refreshes.

Needs ``chex`` and ``hypothesis`` (``pip install chex hypothesis``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspax import _bases
from subspax import _core
from subspax import _linalg
from subspax import _policies
from subspax import _state_types
from subspax import _transitions

MakeTransformation = Callable[..., optax.GradientTransformation]

__all__ = (
    "assert_finite_basis_under_non_finite_gradients",
    "assert_jit_matches_no_jit",
    "assert_orthonormal_after_refreshes",
    "assert_projector",
    "assert_rotate_identity",
    "assert_state_and_dtype_stability",
    "assert_unbiased",
    "check",
    "check_policy",
    "check_transformation",
)


def _settings(max_examples: int):
  # No shrinking: every shape is a new compile, and the first failing shape
  # is reported as it is.
  return hypothesis.settings(
      max_examples=max_examples, deadline=None, derandomize=True,
      database=None,
      phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate))


def _shapes():
  """``(d, D, r)`` with ``r < min(d, D)``, as the default routing ensures."""
  sides = st.tuples(st.integers(3, 24), st.integers(3, 32))
  return sides.flatmap(lambda s: st.tuples(
      st.just(s[0]), st.just(s[1]), st.integers(1, min(min(s) - 1, 6))))


def _gradient(key: jax.Array, d: int, big_d: int) -> jax.Array:
  """A ``(d, D)`` matrix with a decaying spectrum, like a gradient."""
  return jax.random.normal(key, (d, big_d)) * 0.7 ** jnp.arange(d)[:, None]


def _claims_projector(policy: _policies.SubspacePolicy) -> bool:
  return policy.orthonormal and not getattr(policy, "replacement", False)


def _refreshed(policy, d, big_d, r, refreshes, key):
  """The basis after the initial one and ``refreshes`` refreshes."""
  basis = policy.initial(_gradient(key, d, big_d), key, r)

  def body(i, basis):
    k = jax.random.fold_in(key, i)
    return policy.refresh(basis, _gradient(k, d, big_d), k, r)

  return jax.lax.fori_loop(0, refreshes, body, basis)


def _check_refreshed(policy, basis, d, r, refreshes) -> None:
  chex.assert_tree_all_finite(basis)
  if isinstance(basis, _bases.RowBasis):
    index = np.asarray(basis.index)
    assert index.shape == (r,) and np.all((0 <= index) & (index < d)), index
    assert np.all(np.asarray(basis.scale) > 0), basis.scale
  elif policy.orthonormal:
    error = float(_linalg.orthonormality_error(basis.s))
    assert error < 1e-5, f"||S^T S - I||_max = {error} after {refreshes}"


def _projector_images(policy, d, big_d, r, key):
  """``(P P G, P G, P X, X)`` for ``P = back o project``, ``X`` in the span."""
  g = _gradient(key, d, big_d)
  basis = policy.initial(g, key, r)
  proj = lambda x: basis.back(basis.project(x), d)
  inside = basis.back(jax.random.normal(jax.random.fold_in(key, 1),
                                        (r, big_d)), d)
  return proj(proj(g)), proj(g), proj(inside), inside


def _check_projector(images) -> None:
  twice, once, inside_image, inside = images
  chex.assert_trees_all_close(twice, once, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(inside_image, inside, atol=1e-5, rtol=1e-5)


def _rotated_moments(policy, d, big_d, r, key):
  """Moments before and after a ``rotate`` from a basis to itself."""
  basis = policy.initial(_gradient(key, d, big_d), key, r)
  mu = jax.random.normal(jax.random.fold_in(key, 1), (r, big_d))
  nu = jnp.square(mu) + jax.random.uniform(jax.random.fold_in(key, 2),
                                           (r, big_d))
  return _transitions.rotate(basis, basis, mu, nu), (mu, nu)


def _check_rotated(moments) -> None:
  after, before = moments
  chex.assert_trees_all_close(after, before, atol=1e-5, rtol=1e-5)


def assert_orthonormal_after_refreshes(policy: _policies.SubspacePolicy,
                                       d: int, big_d: int, r: int, *,
                                       refreshes: int = 100,
                                       seed: int = 0) -> None:
  """Checks that refreshed bases stay valid.

  A dense orthonormal basis must have ``||S^T S - I||_max < 1e-5`` after
  ``refreshes`` refreshes; a row basis must keep valid indices and scales.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_orthonormal_after_refreshes(
    ...     subspax.RandomSubspace(), 8, 12, 2, refreshes=10)

  Args:
    policy: The policy under test.
    d: Projected dimension of the canonical gradient.
    big_d: Kept dimension ``D``.
    r: Rank.
    refreshes: Refreshes after the initial basis.
    seed: Seed of the gradients and keys.

  Raises:
    AssertionError: when a basis drifts or holds invalid entries.
  """
  basis = jax.jit(lambda key: _refreshed(policy, d, big_d, r, refreshes, key))(
      jax.random.key(seed))
  _check_refreshed(policy, basis, d, r, refreshes)


def assert_projector(policy: _policies.SubspacePolicy, d: int, big_d: int,
                     r: int, *, seed: int = 0) -> None:
  """Checks that ``P = back o project`` is a projector, exact on its span.

  ``P(P G) = P G`` for a random ``G``, and ``P X = X`` for ``X = back(Y)``.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_projector(subspax.SvdSubspace(), 8, 12, 3)

  Args:
    policy: The policy under test (orthonormal, or rows without
      replacement).
    d: Projected dimension of the canonical gradient.
    big_d: Kept dimension ``D``.
    r: Rank.
    seed: Seed of the gradient and keys.

  Raises:
    AssertionError: when either identity fails.
  """
  _check_projector(jax.jit(
      lambda key: _projector_images(policy, d, big_d, r, key))(
          jax.random.key(seed)))


def assert_rotate_identity(policy: _policies.SubspacePolicy, d: int,
                           big_d: int, r: int, *, seed: int = 0) -> None:
  """Checks that rotating the moments from a basis to itself is the identity.

  With ``C = S^T S = I`` the ``rotate`` transition must return ``mu`` and
  ``nu`` unchanged.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_rotate_identity(
    ...     subspax.RandomSubspace(), 8, 12, 3)

  Args:
    policy: The policy under test (an orthonormal basis).
    d: Projected dimension of the canonical gradient.
    big_d: Kept dimension ``D``.
    r: Rank.
    seed: Seed of the moments and keys.

  Raises:
    AssertionError: when the moments change.
  """
  _check_rotated(jax.jit(
      lambda key: _rotated_moments(policy, d, big_d, r, key))(
          jax.random.key(seed)))


def assert_unbiased(policy: _policies.SubspacePolicy, d: int, big_d: int,
                    r: int, unbiased_scale: float, *, num_keys: int = 4000,
                    seed: int = 0) -> None:
  """Checks that ``unbiased_scale * back(project(G))`` averages to ``G``.

  The mean over ``num_keys`` fresh bases must be within 4 standard errors
  (estimated from the samples) of ``G``.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_unbiased(  # a Haar basis: E[S S^T] = r/d I
    ...     subspax.RandomSubspace(), 6, 4, 2, unbiased_scale=3.0,
    ...     num_keys=500)

  Args:
    policy: The policy under test.
    d: Projected dimension of the canonical gradient.
    big_d: Kept dimension ``D``.
    r: Rank.
    unbiased_scale: The ``c`` with ``E[c back(project(G))] = G``.
    num_keys: Bases drawn.
    seed: Seed of the gradient and keys.

  Raises:
    AssertionError: naming the squared error and its expected size.
  """
  g = jax.random.normal(jax.random.key(seed), (d, big_d))

  def estimate(key):
    basis = policy.initial(g, key, r)
    return unbiased_scale * basis.back(basis.project(g), d)

  keys = jax.random.split(jax.random.key(seed + 1), num_keys)
  samples = jax.jit(jax.vmap(estimate))(keys)
  mean = jnp.mean(samples, axis=0)
  spread = float(jnp.sum(jnp.var(samples, axis=0)))  # tr Cov of one sample
  sq_error = float(jnp.sum(jnp.square(mean - g)))
  assert sq_error <= 4.0 * spread / num_keys + 1e-8, (
      f"biased: ||mean - G||^2 = {sq_error}, expected about "
      f"{spread / num_keys}")


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      "wide": jax.random.normal(keys[0], (12, 20), dtype),  # side "left"
      "tall": jax.random.normal(keys[1], (20, 12), dtype),  # side "right"
      "stack": jax.random.normal(keys[2], (2, 8, 16), dtype),
      "bias": jax.random.normal(keys[3], (16,), dtype),
  }


def _grads(i: int, params, scale: float = 1.0):
  return jax.tree.map(
      lambda p: (scale * jax.random.normal(jax.random.key(100 + i), p.shape)
                 ).astype(p.dtype), params)


def _bases_of(state):
  return [x.basis for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, _state_types.ProjectedState))
          if isinstance(x, _state_types.ProjectedState)]


def assert_finite_basis_under_non_finite_gradients(
    tx: optax.GradientTransformation) -> None:
  """Checks that non-finite gradients never reach a basis.

  NaN gradients at the first and at a later refresh must leave every basis
  finite, on a small tree of a wide and a tall matrix, a stack and a bias.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_finite_basis_under_non_finite_gradients(
    ...     subspax.scale_by_grassjump(rank=3, update_interval=2))

  Args:
    tx: The transformation under test; it should refresh every 2 steps.

  Raises:
    AssertionError: when it projects nothing or a basis is not finite.
  """
  params = _params()
  state = tx.init(params)
  assert _bases_of(state), "the transformation projects no parameter"
  step = jax.jit(tx.update)
  nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  for g in (nan, _grads(0, params), _grads(1, params), nan, nan):
    _, state = step(g, state, params)
    chex.assert_tree_all_finite(_bases_of(state))


def assert_jit_matches_no_jit(tx: optax.GradientTransformation, *,
                              steps: int = 3) -> None:
  """Checks that jitted and eager updates agree and the update traces once.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_jit_matches_no_jit(
    ...     subspax.scale_by_grass(rank=3, update_interval=2), steps=2)

  Args:
    tx: The transformation under test (refreshing every 2 steps, ``steps``
      of 3 or more cross a refresh).
    steps: Updates compared.

  Raises:
    AssertionError: when updates or states differ, or it traces again.
  """
  params = _params()
  traces = []

  def update(g, s, p):
    traces.append(None)
    return tx.update(g, s, p)

  jitted = jax.jit(update)
  state_jit = state_eager = tx.init(params)
  for i in range(steps):
    g = _grads(i, params)
    u_jit, state_jit = jitted(g, state_jit, params)
    u_eager, state_eager = tx.update(g, state_eager, params)
    chex.assert_trees_all_close(u_jit, u_eager, rtol=1e-4, atol=1e-6)
  assert len(traces) == 1, f"traced {len(traces)} times"
  chex.assert_trees_all_close(state_jit, state_eager, rtol=1e-4, atol=1e-6)


def assert_state_and_dtype_stability(tx: optax.GradientTransformation, *,
                                     steps: int = 3) -> None:
  """Checks that dtypes, shapes and the state's structure are stable.

  For float32 and bfloat16 parameters, updates must keep each parameter's
  dtype and shape and be finite, and the state must keep its structure,
  shapes and dtypes across ``steps`` steps.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.assert_state_and_dtype_stability(
    ...     subspax.scale_by_rso(rank=3, update_interval=2), steps=2)

  Args:
    tx: The transformation under test.
    steps: Updates taken per dtype.

  Raises:
    AssertionError: naming the leaf whose dtype, shape or structure changed.
  """
  for dtype in (jnp.float32, jnp.bfloat16):
    params = _params(dtype)
    state = init = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(steps):
      updates, state = step(_grads(i, params), state, params)
      chex.assert_trees_all_equal_dtypes(updates, params)
      chex.assert_trees_all_equal_shapes(updates, params)
      chex.assert_tree_all_finite(updates)
      chex.assert_trees_all_equal_structs(init, state)
      chex.assert_trees_all_equal_shapes_and_dtypes(init, state)


def check_policy(policy: _policies.SubspacePolicy, *,
                 unbiased_scale: Union[None, float,
                                       Callable[[int, int], float]] = None,
                 projector: Optional[bool] = None, refreshes: int = 100,
                 max_examples: int = 2, transformation: bool = True,
                 **core_kwargs: Any) -> None:
  """Runs every policy check, then the transformation checks on the core.

  The transformation checks run on ``scale_by_subspace_adam(policy, ...)``
  with ``core_kwargs``.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.check_policy(  # doctest: +SKIP
    ...     subspax.RandomSubspace(), unbiased_scale=lambda d, r: d / r)

  Args:
    policy: The policy under test.
    unbiased_scale: If the policy claims ``E[c S S^T] = I`` for some ``c``,
      that ``c`` or a function ``(d, r) -> c`` (``d / r`` for a Haar basis,
      1 for a Gaussian ``N(0, 1/r)`` one or GRASS with replacement);
      ``None`` skips the unbiasedness check.
    projector: Whether ``back o project`` is a projector; ``None`` infers it
      (orthonormal bases and row selections without replacement).
    refreshes: Refreshes before the orthonormality check.
    max_examples: Shapes drawn by hypothesis per check.
    transformation: Also run :func:`check_transformation` on the core with
      this policy.
    **core_kwargs: More arguments of ``scale_by_subspace_adam`` (``moments``,
      ``recovery``, ...).

  Raises:
    AssertionError: naming the property that fails.
  """
  if not isinstance(policy, _policies.SubspacePolicy):
    raise TypeError(f"policy must be a subspax SubspacePolicy, got {policy!r}.")
  projector = _claims_projector(policy) if projector is None else projector

  @_settings(max_examples)
  @hypothesis.given(_shapes())
  def shapes_hold(shape):
    d, big_d, r = shape

    @jax.jit
    def probe(key):  # one program per shape: the checks share the compile
      out = {"refreshed": _refreshed(policy, d, big_d, r, refreshes, key)}
      if projector:
        out["images"] = _projector_images(policy, d, big_d, r, key)
        out["moments"] = _rotated_moments(policy, d, big_d, r, key)
      return out

    out = probe(jax.random.key(d * 1000 + big_d))
    _check_refreshed(policy, out["refreshed"], d, r, refreshes)
    if projector:
      _check_projector(out["images"])
      _check_rotated(out["moments"])

  shapes_hold()
  if unbiased_scale is not None:
    d, big_d, r = 12, 8, 3
    assert_unbiased(policy, d, big_d, r,
                    unbiased_scale(d, r) if callable(unbiased_scale)
                    else unbiased_scale)
  if transformation:
    check_transformation(
        lambda rank, update_interval: _core.scale_by_subspace_adam(
            policy, rank, update_interval, **core_kwargs))


def check_transformation(make: MakeTransformation, **kwargs: Any) -> None:
  """Runs the transformation checks on ``make(rank=3, update_interval=2)``.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.check_transformation(  # doctest: +SKIP
    ...     subspax.scale_by_apollo_mini)

  Args:
    make: A method factory: ``scale_by_<method>``, ``<method>`` (it gets
      ``learning_rate=1e-2``) or any callable taking ``rank`` and
      ``update_interval`` keywords.
    **kwargs: More keyword arguments for ``make``.

  Raises:
    AssertionError: naming the property that fails.
  """
  params = inspect.signature(make).parameters
  if "learning_rate" in params:
    kwargs = {"learning_rate": 1e-2, **kwargs}
  tx = make(rank=3, update_interval=2, **kwargs)
  assert_finite_basis_under_non_finite_gradients(tx)
  assert_jit_matches_no_jit(tx)
  assert_state_and_dtype_stability(tx)


def check(target: Union[_policies.SubspacePolicy, MakeTransformation],
          **kwargs: Any) -> None:
  """Runs :func:`check_policy` on a policy, else :func:`check_transformation`.

  The one-line entry point for a new policy or method.

  Examples:
    >>> import subspax, subspax.testing
    >>> subspax.testing.check(subspax.fira)  # doctest: +SKIP

  Args:
    target: A ``SubspacePolicy`` or a method factory.
    **kwargs: Options of the check that runs.
  """
  if isinstance(target, _policies.SubspacePolicy):
    check_policy(target, **kwargs)
  else:
    check_transformation(target, **kwargs)

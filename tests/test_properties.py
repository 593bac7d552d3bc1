"""Closed-form properties of docs/algorithms.md section 9, per policy and method.

Orthonormality after 100 refreshes, projector idempotence and finite bases
under non-finite gradients are checked for every policy and method by the
property kit (tests/test_testing_kit.py).
"""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import subspax
from subspax import _transitions
from subspax import _layout
from subspax import _linalg

SETTINGS = hypothesis.settings(max_examples=8, deadline=None,
                               derandomize=True)


def _gradient(key, d, big_d):
  return helpers.decaying_spectrum(key, d, big_d, decay=0.7)


_projection_error = helpers.projection_sq_error


def test_row_projection_without_replacement_is_a_projector():
  key = jax.random.key(2)
  g = jax.random.normal(key, (30, 20))
  basis = subspax.RowSubspace(selection="multinomial").initial(g, key, 7)
  proj = lambda x: basis.back(basis.project(x), 30)
  chex.assert_trees_all_close(proj(proj(g)), proj(g))
  assert len(set(np.asarray(basis.index).tolist())) == 7  # distinct rows
  kept = np.asarray(jnp.any(proj(g) != 0, axis=1)).nonzero()[0]
  assert sorted(kept.tolist()) == sorted(np.asarray(basis.index).tolist())


def _mean_of_estimates(estimate, num_keys):
  keys = jax.random.split(jax.random.key(3), num_keys)
  return jnp.mean(jax.jit(jax.vmap(estimate))(keys), axis=0)


def test_grass_multinomial_with_replacement_is_unbiased():
  d, big_d, r, num_keys = 16, 12, 4, 20000
  g = jax.random.normal(jax.random.key(4), (d, big_d)) * jnp.linspace(
      0.2, 2.0, d)[:, None]
  policy = subspax.RowSubspace(selection="multinomial", replacement=True)

  def estimate(key):
    basis = policy.refresh(None, g, key, r)
    return basis.back(basis.project(g), d)

  mean = _mean_of_estimates(estimate, num_keys)
  q = jnp.linalg.norm(g, axis=1) / jnp.sum(jnp.linalg.norm(g, axis=1))
  # Var of one estimate of G_ij is G_ij^2 (1 - q_i) / (r q_i).
  expected_sq_error = jnp.sum(jnp.square(g) * ((1 - q) / (r * q))[:, None])
  sq_error = jnp.sum(jnp.square(mean - g))
  assert float(sq_error) < 3.0 * float(expected_sq_error) / num_keys
  assert float(sq_error) > 0.1 * float(expected_sq_error) / num_keys


def test_scaled_haar_projection_is_unbiased():
  d, big_d, r, num_keys = 16, 10, 4, 20000
  g = jax.random.normal(jax.random.key(5), (d, big_d))
  policy = subspax.RandomSubspace()

  def estimate(key):
    basis = policy.sample(key, d, r)
    return (d / r) * basis.back(basis.project(g), d)

  mean = _mean_of_estimates(estimate, num_keys)
  # E||(d/r) S S^T g - g||^2 = (d/r - 1) ||g||^2 for a Haar S.
  expected_sq_error = (d / r - 1) * jnp.sum(jnp.square(g))
  sq_error = jnp.sum(jnp.square(mean - g))
  assert float(sq_error) < 3.0 * float(expected_sq_error) / num_keys


def test_rotate_with_identity_is_identity_and_permutation_permutes():
  r, big_d = 5, 7
  mu = jax.random.normal(jax.random.key(6), (r, big_d))
  nu = jnp.square(mu) + jax.random.uniform(jax.random.key(7), (r, big_d))
  s = _linalg.haar_basis(jax.random.key(8), 12, r)
  same = subspax.DenseBasis(s)
  new_mu, new_nu, _ = _transitions._transition("rotate", same, same, mu, nu, None)
  chex.assert_trees_all_close((new_mu, new_nu), (mu, nu), atol=1e-5)
  perm = jnp.array([3, 0, 4, 1, 2])
  permuted = subspax.DenseBasis(s[:, perm])
  new_mu, new_nu, _ = _transitions._transition("rotate", same, permuted, mu, nu,
                                        None)
  chex.assert_trees_all_close((new_mu, new_nu), (mu[perm], nu[perm]),
                              atol=1e-5)


def test_overlap_keeps_shared_rows_with_their_ages():
  old = subspax.RowBasis(jnp.array([4, 1, 7]), jnp.ones(3))
  new = subspax.RowBasis(jnp.array([7, 2, 4]), jnp.ones(3))
  mu = jnp.arange(3.0)[:, None] + jnp.zeros((3, 2))
  nu = mu + 10.0
  age = jnp.array([5, 6, 9])
  new_mu, new_nu, new_age = _transitions._transition("overlap", old, new, mu, nu, age)
  np.testing.assert_allclose(new_mu[:, 0], [2.0, 0.0, 0.0])
  np.testing.assert_allclose(new_nu[:, 0], [12.0, 0.0, 10.0])
  np.testing.assert_array_equal(new_age, [9, 0, 5])


@SETTINGS
@hypothesis.given(d=st.integers(6, 40), big_d=st.integers(6, 40),
                  r=st.integers(1, 5), seed=st.integers(0, 1000))
def test_geodesic_step_zero_is_identity_and_small_step_descends(
    d, big_d, r, seed):
  key = jax.random.key(seed)
  g = jax.random.normal(key, (d, big_d))
  s = _linalg.haar_basis(jax.random.fold_in(key, 1), d, r)
  still = subspax.GeodesicSubspace(eta=0.0).refresh(
      subspax.DenseBasis(s), g, key, r)
  chex.assert_trees_all_close(still.s, s, atol=1e-6)
  moved = subspax.GeodesicSubspace(eta=0.05).refresh(
      subspax.DenseBasis(s), g, key, r)
  assert float(_projection_error(moved.s, g)) < float(_projection_error(s, g))
  assert float(_linalg.orthonormality_error(moved.s)) < 1e-5


@pytest.mark.parametrize("shape", [(24, 48), (48, 24)])
def test_subtrack_basis_moves_on_both_sides(shape):
  """The reference code's tangent leaves bases with out >= in frozen."""
  params = {"w": jnp.zeros(shape)}
  tx = subspax.scale_by_subtrack(rank=4, update_interval=1)
  state = tx.init(params)
  bases = []
  for i in range(3):
    g = {"w": jax.random.normal(jax.random.key(i), shape)}
    _, state = tx.update(g, state)
    bases.append(state.inner_states["subspace"].inner_state.matrices["w"]
                 .basis.s)
  assert float(jnp.abs(bases[2] - bases[1]).max()) > 1e-3
  F = lambda s, g: _projection_error(s, g if shape[0] <= shape[1] else g.T)
  g = jax.random.normal(jax.random.key(2), shape)
  assert float(F(bases[2], g)) < float(F(bases[1], g))


class _IdentitySubspace(subspax.SubspacePolicy):
  """A dense policy forced to ``S = I`` (for the exact-Adam check)."""

  def refresh(self, basis, g, key, r):
    return subspax.DenseBasis(jnp.eye(g.shape[0], r))


@pytest.mark.parametrize("tx", [
    subspax.scale_by_grass(rank=16, update_interval=1000, selection="topk",
                           projected=True),
    subspax.scale_by_subspace_adam(_IdentitySubspace(), rank=16,
                                   projected=True),
], ids=["grass_topk_all_rows", "dense_identity"])
def test_identity_basis_reproduces_adam(tx):
  params = {"w": jnp.zeros((16, 24)), "b": jnp.zeros((24,))}
  adam = optax.scale_by_adam()
  state, adam_state = tx.init(params), adam.init(params)
  # Both jitted: XLA's fused pow differs from the eager one in the last bits.
  update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
  for i in range(6):
    g = {"w": jax.random.normal(jax.random.key(i), (16, 24)),
         "b": jax.random.normal(jax.random.key(i + 9), (24,))}
    u, state = update(g, state)
    expected, adam_state = adam_update(g, adam_state)
    chex.assert_trees_all_close(u, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, side, steps", [((32, 24), "left", 8),
                                                ((16, 40), "right", 3)])
def test_galore_matches_optax_contrib_galore(shape, side, steps):
  """Same side, rank, gap, scale and Adam constants.

  optax always takes the SVD of ``G``; on the right side subspax takes it of
  ``G^T`` (its canonical form). The singular vectors then agree up to sign,
  which is harmless inside an interval but changes how GaLore's kept moments
  line up after a refresh, so the right side is compared over one interval.
  """
  params = {"w": jnp.zeros(shape), "b": jnp.zeros((shape[1],))}
  ours = subspax.galore(0.1, rank=4, update_interval=3, scale=0.25,
                        side=side, projected=True)
  theirs = optax.contrib.galore(0.1, rank=4, update_proj_gap=3, scale=0.25)
  state, their_state = ours.init(params), theirs.init(params)
  for i in range(steps):
    g = {"w": _gradient(jax.random.key(i), *shape) * 3,
         "b": jax.random.normal(jax.random.key(i), (shape[1],))}
    u, state = ours.update(g, state, params)
    expected, their_state = theirs.update(g, their_state, params)
    chex.assert_trees_all_close(u, expected, rtol=1e-5, atol=1e-6)


def test_keyed_grassjump_equals_stored_grassjump():
  params = {"w": jnp.zeros((12, 20)), "v": jnp.zeros((2, 16, 8))}
  stored = subspax.scale_by_grassjump(rank=3, update_interval=2, key=7)
  keyed = subspax.scale_by_grassjump(rank=3, update_interval=2, key=7,
                                     store_basis=False)
  s1, s2 = stored.init(params), keyed.init(params)
  assert subspax.state_bytes(s2) < subspax.state_bytes(s1)
  for i in range(5):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape),
                     params)
    u1, s1 = stored.update(g, s1)
    u2, s2 = keyed.update(g, s2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_stacked_matrices_are_independent():
  """A (3, m, n) stack behaves like three separate (m, n) parameters."""
  ws = jax.random.normal(jax.random.key(0), (3, 10, 14))
  stacked = subspax.scale_by_galore(rank=3, update_interval=2)
  separate = subspax.scale_by_galore(rank=3, update_interval=2)
  s1 = stacked.init({"w": ws})
  s2 = separate.init({"w": list(ws)})
  for i in range(4):
    g = jax.random.normal(jax.random.key(i), ws.shape)
    u1, s1 = stacked.update({"w": g}, s1)
    u2, s2 = separate.update({"w": list(g)}, s2)
    chex.assert_trees_all_close(u1["w"], jnp.stack(u2["w"]), rtol=1e-5,
                                atol=1e-7)


def test_recovery_limiter_bounds_norm_growth():
  params = {"w": jnp.zeros((16, 32))}
  tx = subspax.scale_by_grassjump(rank=2, update_interval=100,
                                  recovery_limit=1.01)
  state = tx.init(params)
  norms = []
  for i in range(6):  # gradients growing 10x per step
    g = {"w": 10.0**i * jax.random.normal(jax.random.key(i), (16, 32))}
    _, state = tx.update(g, state)
    norms.append(float(state.inner_states["subspace"].inner_state
                       .matrices["w"].last_norm))
  ratios = np.array(norms[1:]) / np.array(norms[:-1])
  assert np.all(ratios <= 1.01 + 1e-5), ratios


def test_recovery_adds_nothing_for_gradients_inside_the_subspace():
  params = {"w": jnp.zeros((10, 16))}
  with_recovery = subspax.scale_by_subtrack(rank=3, update_interval=100,
                                            init="svd")
  without = subspax.scale_by_subtrack(rank=3, update_interval=100, init="svd",
                                      recovery=False)
  g = {"w": jax.random.normal(jax.random.key(1), (10, 3)) @ jax.random.normal(
      jax.random.key(2), (3, 16))}  # rank 3: inside the top-3 subspace
  u1, _ = with_recovery.update(g, with_recovery.init(params))
  u2, _ = without.update(g, without.init(params))
  chex.assert_trees_all_close(u1, u2, atol=1e-4)


def test_default_routing():
  params = {"embed": jnp.zeros((1000, 64)), "attn": jnp.zeros((64, 64)),
            "mlp": jnp.zeros((2, 64, 172)), "norm": jnp.zeros((64,)),
            "small": jnp.zeros((8, 64))}
  state = subspax.scale_by_subtrack(rank=16).init(params)
  matrices = state.inner_states["subspace"].inner_state.matrices
  projected = {k for k, v in matrices.items()
               if isinstance(v, subspax.ProjectedState)}
  assert projected == {"attn", "mlp"}
  assert matrices["mlp"].layout.batch_shape == (2,)
  explicit = subspax.scale_by_subtrack(
      rank=16, projected=lambda path, p: p.ndim == 2).init(params)
  layout = explicit.inner_states["subspace"].inner_state.matrices[
      "small"].layout
  assert layout.rank == 8 and layout.side == "left"


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=2.5), "rank must be a positive int"),
    (dict(update_interval=0), "update_interval must be a positive int"),
    (dict(side="top"), "side must be one of"),
    (dict(b1=1.5), "b1 must be in"),
    (dict(selection="best"), "selection must be one of"),
    (dict(keep_overlap=True, selection="nope"), "selection must be one of"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    subspax.grass(1e-3, **kwargs)


@pytest.mark.parametrize("factory, kwargs, message", [
    (subspax.subtrack, dict(step="fast"), "step must be one of"),
    (subspax.subtrack, dict(init="qr"), "init must be one of"),
    (subspax.grasswalk, dict(jump_prob=2.0), "jump_prob must be in"),
    (subspax.rso, dict(orthonormal=False, store_basis=False), None),
])
def test_method_specific_arguments(factory, kwargs, message):
  if message is None:
    factory(1e-3, **kwargs)  # valid combination
    return
  with pytest.raises(ValueError, match=message):
    factory(1e-3, **kwargs)


def test_projecting_a_vector_is_a_clear_error():
  tx = subspax.subtrack(1e-3, rank=2, projected=lambda path, p: True)
  with pytest.raises(ValueError, match="at least 2 dimensions"):
    tx.init({"b": jnp.zeros((5,))})


@SETTINGS
@hypothesis.given(m=st.integers(2, 24), n=st.integers(2, 24),
                  batch=st.sampled_from([(), (2,), (2, 3)]),
                  rank=st.integers(1, 30),
                  side=st.sampled_from(["auto", "left", "right"]))
def test_layout_shapes_and_matrix_round_trip(m, n, batch, rank, side):
  shape = batch + (m, n)
  layout = _layout.make_layout(shape, subspax.MatrixSpec(), rank, side)
  expected_side = ("left" if m <= n else "right") if side == "auto" else side
  assert layout.side == expected_side
  d, big_d = (m, n) if expected_side == "left" else (n, m)
  assert (layout.d, layout.D, layout.rank) == (d, big_d, min(rank, d))
  x = jax.random.normal(jax.random.key(m * n), shape)
  matrices = layout.to_matrices(x, dtype=x.dtype)
  chex.assert_shape(matrices, (layout.num_matrices, m, n))
  chex.assert_trees_all_equal(layout.from_matrices(matrices, x.dtype), x)


def test_matrix_spec_groups_axes_and_treats_the_rest_as_batch():
  """An attention kernel (embed, heads, head_dim) as embed x (heads*head_dim)."""
  spec = subspax.MatrixSpec(rows=0, cols=(1, 2))
  params = {"q": jnp.zeros((32, 4, 16))}
  tx = subspax.scale_by_subtrack(rank=8, projected={"q": spec})
  state = tx.init(params)
  leaf = state.inner_states["subspace"].inner_state.matrices["q"]
  assert (leaf.layout.m, leaf.layout.n, leaf.layout.side) == (32, 64, "left")
  chex.assert_shape(leaf.mu, (8, 64))
  updates, _ = tx.update({"q": jnp.ones((32, 4, 16))}, state)
  chex.assert_shape(updates["q"], (32, 4, 16))

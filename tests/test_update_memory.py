"""The core's update loop: the same updates as before, in constant workspace.

The update of a projected parameter runs one matrix at a time, in row blocks,
overwriting the gradient with the update (subspax/_blocks.py). These tests
check that this changed nothing in the math (against updates recorded with
the earlier vmapped implementation, tests/fixtures/make_update_fixture.py) and
that the compiled update's temporary memory does not grow with the number of
stacked matrices.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspax

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures"))
import make_update_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position

_REFERENCE = np.load(make_update_fixture.OUT)


# The blocked projection sums S^T G in another order (float32 rounding,
# ~1e-7 on the jax that recorded the fixture). Another XLA release fuses and
# orders reductions differently: ~4e-6 of the largest update on jax 0.12.1.
# An SVD or the geodesic refresh (the top singular pair of a near-degenerate
# r x r problem) amplifies that to ~3e-5 in the next interval's updates.
# A wrong formula moves updates by O(1), far above either tolerance.
_TOLERANCE = {"subtrack": 1e-4, "grasswalk": 1e-4, "galore": 1e-4,
              "fira": 1e-4}
_DEFAULT_TOLERANCE = 2e-5


@pytest.mark.parametrize("case", sorted(make_update_fixture.CASES))
def test_updates_equal_the_recorded_ones(case):
  got = make_update_fixture.run(case)
  assert got, case
  for name, value in got.items():
    want = _REFERENCE[name]
    scale = np.max(np.abs(want)) + 1e-30
    np.testing.assert_array_less(np.max(np.abs(value - want)) / scale,
                                 _TOLERANCE.get(case, _DEFAULT_TOLERANCE), err_msg=name)


def _update_temp_bytes(tx, shape, num_leaves=1):
  params = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.float32)
            for i in range(num_leaves)}
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
      params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("method", ["subtrack", "grass", "rso", "apollo"])
def test_update_temp_does_not_grow_with_stacked_matrices(method):
  """Temp of an (L, m, n) update: the same for L = 2 and L = 8."""
  m, n = 128, 256
  one_matrix = m * n * 4
  tx = getattr(subspax, "scale_by_" + method)(16, 10)
  temps = {layers: _update_temp_bytes(tx, (layers, m, n))
           for layers in (2, 8)}
  # Six more matrices add nothing (the vmapped update added ~2 matrices each).
  assert temps[8] <= temps[2] + one_matrix // 8, temps
  # The workspace of one matrix: row blocks, the basis and reduced moments.
  assert temps[8] <= one_matrix * 4, (temps, one_matrix)


def test_recovery_norm_is_accurate_when_gradient_is_inside_the_subspace():
  """The stored ||Lambda|| equals the residual's, also when it is tiny.

  A rank-3 gradient plus 1e-5 noise on an 8 x 12 weight with the exact top-3
  basis: the residual is ~1e-5 of G, where ||G_j||^2 - ||R_j||^2 cancels in
  float32 (the shortcut stored 8.3e-4 for a true 1.1e-5).
  """
  rng = np.random.default_rng(0)
  low_rank = rng.normal(size=(8, 3)) @ rng.normal(size=(3, 12))
  g = (low_rank + 1e-5 * rng.normal(size=(8, 12))).astype(np.float32)
  tx = subspax.scale_by_subtrack(3, 100, init="svd")
  state = tx.init({"w": jnp.zeros((8, 12))})
  _, state = tx.update({"w": jnp.asarray(g)}, state)
  inner = state.inner_states["subspace"].inner_state
  matrix_state = inner.matrices["w"]
  s = np.asarray(matrix_state.basis.s, np.float64)
  g64 = g.astype(np.float64)
  residual = g64 - s @ (s.T @ g64)
  # phi for one step of Adam from zero moments: |N_j| / |R_j| per column.
  reduced = s.T @ g64
  normalized = reduced / (np.abs(reduced) + 1e-8)
  phi = np.linalg.norm(normalized, axis=0) / (
      np.linalg.norm(reduced, axis=0) + 1e-8)
  want = np.linalg.norm(residual * phi)
  got = float(matrix_state.last_norm)
  assert got == pytest.approx(want, rel=2e-2), (got, want)


@pytest.mark.parametrize("method", ["galore", "subtrack", "grass"])
def test_many_leaves_update_fits_one_matrix_of_workspace(method):
  """Separate leaves, learning rate chained: temp does not grow with them.

  Each parameter's accumulators are filled when its turn comes and each
  update is written in place (before: a zero-filled accumulator per leaf
  up front, and an update copy per leaf; 16 leaves took 17 matrices).
  """
  m, n = 128, 256
  one_matrix = m * n * 4
  tx = getattr(subspax, method)(1e-3, 16, 10)
  temps = {leaves: _update_temp_bytes(tx, (m, n), num_leaves=leaves)
           for leaves in (4, 16)}
  assert temps[16] <= temps[4] + one_matrix // 4, temps
  # The workspace of one matrix: GaLore's SVD holds about three (a copy of
  # G for LAPACK, U and V^T), the others under two.
  assert temps[16] <= (3 if method == "galore" else 2) * one_matrix, (
      temps[16] / one_matrix)


def test_row_blocks_ignore_non_finite_rows_they_do_not_select():
  """A GRASS projection read in row blocks sees only the selected rows."""
  from subspax import _blocks  # pylint: disable=g-import-not-at-top
  g = np.ones((1, 256, 8), np.float32)
  g[0, 0] = np.inf  # not selected; where block 0 points its empty slots
  basis = subspax.RowBasis(jnp.array([5, 200], jnp.int32),
                           jnp.array([2.0, 3.0], jnp.float32))
  matrix = _blocks.StackedMatrix(jnp.asarray(g), 0, basis, 2, right=False)
  assert _blocks.num_row_blocks(256) > 1
  np.testing.assert_array_equal(matrix.project(),
                                np.stack([np.full(8, 2.0), np.full(8, 3.0)]))


@pytest.mark.parametrize("method", ["subtrack", "grass"])
def test_bench_measures_the_update_with_and_without_donated_gradients(method):
  """bench.update_memory compiles both ways: gradients and state donated (a
  train step), and the state only (the caller keeps the gradients, which the
  in-place update then copies: at most one copy of them more)."""
  from bench import update_memory  # pylint: disable=g-import-not-at-top
  tree = {f"w{i}": jax.ShapeDtypeStruct((64, 96), jnp.float32)
          for i in range(4)}
  grads = 4 * 64 * 96 * 4
  tx = subspax.METHODS[method](1e-3, 8, 200)
  assert update_memory.DONATIONS == {"grads+state": (0, 1), "state": (1,)}
  donated = update_memory.measure(tx, tree, update_memory.DONATIONS[
      "grads+state"])
  kept = update_memory.measure(tx, tree, update_memory.DONATIONS["state"])
  assert donated["peak"] <= kept["peak"] <= donated["peak"] + grads, (
      donated, kept)

"""The update itself, checked against independent float64 NumPy computations.

These tests read the optimizer state through the public API (``tx.init``,
``tx.update`` and the fields of :class:`subspax.ProjectedState`) and recompute
what each step must produce from docs/algorithms.md, in float64:

* the LDAdam rotation of the moments at a refresh, on the generic (dense,
  non-permutation) change of basis ``C = S_new^T S_old`` that a real refresh
  produces, for every method whose moment policy is ``rotate``;
* the whole recovery update ``alpha S N + Lambda`` with ``phi`` and the
  norm-growth limiter, on steps where the limiter fires, on both sides, on a
  stacked leaf and on matrices the core splits into row blocks;
* a reset (RSO, GRASS) restarting the moments and their bias correction, the
  basis changing only at refresh steps, each policy's refresh in closed form
  (SubTrack++ descends F, GrassWalk turns one direction by eta, GRASS's
  sampling scales) and per-matrix subspaces of a stack;
* losses that only the projected matrices can lower (every leaf is projected);
* golden sums of the updates over several refreshes, recorded as literals;
* the layer modes' forward pass and delta gradient (subspax.reparam).

``scripts/mutants.py`` lists the deliberate bugs these tests must catch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import subspax

B1, B2, EPS = 0.9, 0.999, 1e-8

# The methods whose moments are rotated at a refresh (docs/algorithms.md
# sections 5.2-5.4), with a step large enough that C is far from the
# identity. SubTrack++'s step rule is pinned: its default may change, the
# rotation must not.
ROTATING = {
    "subtrack": lambda **kw: subspax.scale_by_subtrack(
        step="normalized", eta=10.0, **kw),
    "grasswalk": lambda **kw: subspax.scale_by_grasswalk(eta=1.0, **kw),
    "grassjump": lambda **kw: subspax.scale_by_grassjump(**kw),
}


def _matrices(state):
  """The ``ProjectedState`` per leaf of a ``scale_by_<method>`` state."""
  return state.inner_states["subspace"].inner_state.matrices


def _snapshot(leaf_state):
  """Per-matrix float64 NumPy copies of a leaf's state.

  Returns:
    ``s`` ``(B, d, r)``, ``mu``/``nu`` ``(B, r, D)`` and ``last_norm``
    ``(B,)`` (``None`` without recovery), ``B`` the number of stacked
    matrices (1 for a plain matrix).
  """
  def flat(x, trailing):
    x = np.asarray(x, np.float64)
    return x.reshape((-1,) + x.shape[x.ndim - trailing:])
  norm = leaf_state.last_norm
  return {"s": flat(leaf_state.basis.s, 2), "mu": flat(leaf_state.mu, 2),
          "nu": flat(leaf_state.nu, 2),
          "last_norm": (None if isinstance(norm, optax.MaskedNode)
                        else flat(norm, 0))}


def _canonical(g, side):
  """``(B, d, D)``: the gradient as the core sees it (transposed if right)."""
  g = np.asarray(g, np.float64)
  g = g.reshape((-1,) + g.shape[-2:])
  return np.swapaxes(g, -1, -2) if side == "right" else g


def _rotate(c, mu, nu):
  """LDAdam (docs/algorithms.md section 3): ``C mu`` and ``|C^2 (nu - mu^2) +
  (C mu)^2|``, written with explicit sums so it shares no code with the core."""
  r = c.shape[0]
  new_mu = np.zeros_like(mu)
  new_nu = np.zeros_like(nu)
  for i in range(r):
    for k in range(r):
      new_mu[i] += c[i, k] * mu[k]
      new_nu[i] += c[i, k] ** 2 * (nu[k] - mu[k] ** 2)
  return new_mu, np.abs(new_nu + new_mu**2)


def _adam(mu, nu, reduced, t):
  """One reduced Adam step at 1-based step ``t``: new moments and ``N``."""
  mu = B1 * mu + (1 - B1) * reduced
  nu = B2 * nu + (1 - B2) * reduced**2
  normalized = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
  return mu, nu, normalized


def _gradients(shape, steps, seed=0):
  return [jax.random.normal(k, shape)
          for k in jax.random.split(jax.random.key(seed), steps)]


@pytest.mark.parametrize("name", sorted(ROTATING))
@pytest.mark.parametrize("shape", [(10, 16), (16, 10)], ids=["left", "right"])
def test_refresh_rotates_the_moments_ldadam_style(name, shape):
  """At a refresh, mu and nu are the rotated old moments plus the new
  gradient's Adam contribution (C generic: C^2 != C, C^2 mu^2 != (C mu)^2)."""
  side = "left" if shape[0] <= shape[1] else "right"
  tx = ROTATING[name](rank=4, update_interval=2, key=3)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  checked = 0
  for step, g in enumerate(_gradients(shape, 5)):
    before = _snapshot(_matrices(state)["w"])
    _, state = update({"w": g}, state)
    after = _snapshot(_matrices(state)["w"])
    if step == 0 or step % 2:
      continue
    s_old, s_new = before["s"][0], after["s"][0]
    c = s_new.T @ s_old
    assert np.abs(c - np.eye(4)).max() > 0.05, "the refresh did not move S"
    mu, nu = _rotate(c, before["mu"][0], before["nu"][0])
    reduced = s_new.T @ _canonical(g, side)[0]
    mu, nu, _ = _adam(mu, nu, reduced, step + 1)
    np.testing.assert_allclose(after["mu"][0], mu, rtol=1e-4,
                               atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(after["nu"][0], nu, rtol=1e-4,
                               atol=1e-5 * np.abs(nu).max())
    checked += 1
  assert checked == 2


def test_rotation_formula_differs_from_its_linear_shortcuts():
  """The reference computation above is not fooled by a generic C: the
  shortcuts a 0/1 or permutation C cannot tell apart give other values."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  c = q[:3, :3]
  mu, nu = rng.normal(size=(3, 5)), rng.uniform(1, 2, size=(3, 5))
  new_mu, new_nu = _rotate(c, mu, nu)
  np.testing.assert_allclose(new_mu, c @ mu)
  np.testing.assert_allclose(
      new_nu, np.abs(np.square(c) @ (nu - mu**2) + (c @ mu) ** 2))
  assert np.abs(new_nu - np.square(c) @ nu).max() > 0.1
  assert np.abs(new_nu - c @ nu).max() > 0.1


def _expected_recovery_update(snapshot_before, s, g, t, zeta, alpha):
  """``alpha S N + Lambda`` and ``||Lambda||`` for one canonical matrix.

  ``Lambda = (G - S S^T G) diag(phi)``, ``phi_j = ||N_j|| / (||R_j|| + 1e-8)``,
  scaled down to ``zeta * last_norm`` when it grew faster (docs/algorithms.md
  section 4).
  """
  reduced = s.T @ g
  _, _, normalized = _adam(snapshot_before["mu"], snapshot_before["nu"],
                           reduced, t)
  phi = np.linalg.norm(normalized, axis=0) / (
      np.linalg.norm(reduced, axis=0) + 1e-8)
  lam = (g - s @ reduced) * phi[None, :]
  norm = np.linalg.norm(lam)
  last = snapshot_before["last_norm"]
  fired = last > 0 and norm > zeta * last
  if fired:
    lam *= zeta * last / norm
  return alpha * s @ normalized + lam, np.linalg.norm(lam), fired


def _growing_residual(rng, s, shape, side, t):
  """A gradient whose part outside ``span(S)`` grows 3x per step (so
  ``Lambda`` does too and the limiter must fire) while ``S^T G`` does not;
  a plain random gradient at the first step (``S`` is not chosen yet)."""
  g = rng.normal(size=_canonical(np.zeros(shape), side).shape)
  if t > 1:
    inside = np.einsum("bdr,bre->bde", s, np.einsum("bdr,bde->bre", s, g))
    g = inside + 3.0**t * (g - inside)
  g = np.swapaxes(g, -1, -2) if side == "right" else g
  return jnp.asarray(g.reshape(shape), jnp.float32)


@pytest.mark.parametrize("name, shape", [
    ("grassjump", (12, 20)), ("grassjump", (20, 12)),
    ("grassjump", (2, 12, 20)), ("subtrack", (12, 20)),
    ("grasswalk", (20, 12)), ("grassjump", (128, 136)),
    ("subtrack", (136, 128))], ids=[
        "jump-left", "jump-right", "jump-stack", "subtrack-left", "walk-right",
        "jump-left-128", "subtrack-right-128"])
def test_recovery_update_in_closed_form_with_the_limiter_firing(name, shape):
  """The emitted update is ``alpha S N + Lambda`` with the limiter applied to
  Lambda itself (not only to the stored norm), per stacked matrix."""
  zeta, alpha = 1.01, 0.25
  side = "left" if shape[-2] <= shape[-1] else "right"
  tx = ROTATING[name](rank=3, update_interval=100, key=1, scale=alpha,
                      recovery_limit=zeta)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  fired = []
  rng = np.random.default_rng(4)
  for t in range(1, 6):
    before = _snapshot(_matrices(state)["w"])
    g = _growing_residual(rng, before["s"], shape, side, t)
    u, state = update({"w": g}, state)
    after = _snapshot(_matrices(state)["w"])
    g_canonical, u_canonical = _canonical(g, side), _canonical(u["w"], side)
    for b, g_b in enumerate(g_canonical):
      matrix_before = {k: v[b] for k, v in before.items() if k != "s"}
      expected, norm, fire = _expected_recovery_update(
          matrix_before, after["s"][b], g_b, t, zeta, alpha)
      fired.append(fire)
      np.testing.assert_allclose(u_canonical[b], expected, rtol=2e-4,
                                 atol=2e-5 * np.abs(expected).max(),
                                 err_msg=f"step {t}, matrix {b}")
      np.testing.assert_allclose(after["last_norm"][b], norm, rtol=2e-4)
  num = len(fired) // 5
  assert not any(fired[:num]) and all(fired[2 * num:]), fired


def test_stacked_matrices_get_their_own_random_subspaces():
  """Each matrix of a ``(3, m, n)`` stack draws its own subspace, even when
  the three gradients are equal (per-matrix keys, docs/algorithms.md
  section 1)."""
  tx = subspax.scale_by_grassjump(rank=3, update_interval=4, key=2)
  state = tx.init({"w": jnp.zeros((3, 12, 16))})
  g = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (12, 16)),
                       (3, 12, 16))
  u, state = tx.update({"w": g}, state)
  s = _snapshot(_matrices(state)["w"])["s"]
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    overlap = np.linalg.svd(s[i].T @ s[j], compute_uv=False)
    assert overlap.min() < 0.99, (i, j, overlap)
    assert np.abs(u["w"][i] - u["w"][j]).max() > 1e-3


def _teacher_problem(key):
  """``min ||gelu(X W1) W2 - Y||^2`` for a planted two-layer teacher.

  Every parameter is a matrix the optimizer projects (no biases, no
  embedding): only the subspace updates can lower this loss.
  """
  kx, k1, k2, k3, k4 = jax.random.split(key, 5)
  x = jax.random.normal(kx, (96, 16))
  y = jax.nn.gelu(x @ jax.random.normal(k1, (16, 24)) / 4) @ (
      jax.random.normal(k2, (24, 20)))
  params = {"w1": jax.random.normal(k3, (16, 24)) / 4,
            "w2": jax.random.normal(k4, (24, 20)) / 8}

  def loss(p):
    return jnp.mean(jnp.square(jax.nn.gelu(x @ p["w1"]) @ p["w2"] - y))

  return loss, params


@pytest.mark.parametrize("name", helpers.CORE)
def test_only_projected_matrices_lower_the_loss(name):
  """No leaf goes to plain Adam here, so the loss falls only if the projected
  updates move the weights the right way."""
  loss, params = _teacher_problem(jax.random.key(5))
  tx = helpers.make_tx(name, learning_rate=3e-2, rank=4, update_interval=10,
                       projected=True)
  state = tx.init(params)
  projected = jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, subspax.ProjectedState))
  assert sum(isinstance(x, subspax.ProjectedState) for x in projected) == 2
  _, _, losses = helpers.run(tx, loss, params, 120)
  assert losses[-1] < 0.5 * losses[0], losses[::12]


# sum_t <U_t, P> and sum_t ||U_t||^2 over 8 steps (refreshes at steps 0, 3
# and 6) of a fixed gradient sequence on helpers.random_params (a right-side
# matrix, a stack of three left-side matrices, a bias) with a fixed probe P;
# rank 3, learning rate 1. Recorded with this file's `_golden_numbers`.
GOLDEN = {
    "galore": (4.58712, 87.1983),
    "subtrack": (24.5285, 1833.54),
    "grasswalk": (22.2299, 2023.21),
    "grassjump": (144.306, 2848.48),
    "grassjump_keyed": (144.306, 2848.48),
    "rso": (-85.7505, 1110.87),
    "grass": (-16.673, 1101.33),
    "fira": (22.8287, 1461.44),
    "apollo": (80.2889, 1445.42),
    "apollo_mini": (236.463, 87930.7),
}


def _golden_numbers(name):
  """The two golden sums of ``name`` (see ``GOLDEN``)."""
  extra = {"step": "normalized", "eta": 10.0} if name == "subtrack" else {}
  tx = helpers.make_tx(name, learning_rate=1.0, rank=3, update_interval=3,
                       **extra)
  params = helpers.random_params(jax.random.key(0))
  probe = helpers.random_params(jax.random.key(1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  inner, square = 0.0, 0.0
  for t in range(8):
    grads = helpers.random_params(jax.random.key(10 + t))
    u, state = update(grads, state, params)
    inner += sum(float(jnp.vdot(a, b)) for a, b in zip(
        jax.tree.leaves(u), jax.tree.leaves(probe)))
    square += sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(u))
  return inner, square


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_updates_across_refreshes(name):
  np.testing.assert_allclose(_golden_numbers(name), GOLDEN[name], rtol=1e-4)


def _refresh_pair(tx, shape, steps=3, update_interval=2):
  """``(basis before, basis after, canonical G)`` at the refresh at step
  ``update_interval``, through the public API."""
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for step, g in enumerate(_gradients(shape, steps, seed=7)):
    before = _matrices(state)["w"].basis
    _, state = update({"w": g}, state)
    if step == update_interval:
      return before, _matrices(state)["w"].basis, g
  raise AssertionError("no refresh")


def _projection_error(s, g):
  return np.sum(np.square(g - s @ (s.T @ g)))


@pytest.mark.parametrize("step, eta", [("normalized", 0.05), ("raw", 1e-3),
                                       ("angle", 0.05)])
def test_subtrack_refresh_lowers_the_projection_error(step, eta):
  """A small step along SubTrack++'s tangent descends ``F(S) = ||G - S S^T
  G||^2`` for the gradient of the refresh step (each step rule)."""
  tx = subspax.scale_by_subtrack(rank=3, update_interval=2, step=step, eta=eta)
  before, after, g = _refresh_pair(tx, (12, 20))
  s_old, s_new = np.asarray(before.s, np.float64), np.asarray(after.s,
                                                              np.float64)
  g = np.asarray(g, np.float64)
  assert np.abs(s_new - s_old).max() > 1e-4
  assert _projection_error(s_new, g) < _projection_error(s_old, g)


def test_grasswalk_refresh_turns_one_direction_by_eta():
  """GrassWalk moves along a horizontal geodesic: exactly one principal angle
  between the old and the new subspace is ``eta``, the others are 0."""
  eta = 0.3
  tx = subspax.scale_by_grasswalk(rank=3, update_interval=2, eta=eta)
  before, after, _ = _refresh_pair(tx, (12, 20))
  cosines = np.linalg.svd(np.asarray(before.s, np.float64).T @ np.asarray(
      after.s, np.float64), compute_uv=False)
  np.testing.assert_allclose(np.sort(cosines), [np.cos(eta), 1.0, 1.0],
                             atol=1e-5)


def test_grass_multinomial_scales_are_those_of_norm_proportional_sampling():
  """With replacement, row ``i`` is drawn with ``q_i = ||G_i|| / sum ||G_j||``
  and scaled by ``1 / sqrt(r q_i)`` (docs/algorithms.md 5.6)."""
  r = 4
  tx = subspax.scale_by_grass(rank=r, update_interval=2, replacement=True)
  _, after, g = _refresh_pair(tx, (12, 20))
  norms = np.linalg.norm(np.asarray(g, np.float64), axis=1)
  q = norms / norms.sum()
  index = np.asarray(after.index)
  np.testing.assert_allclose(after.scale, 1 / np.sqrt(r * q[index]),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["rso", "grass"])
def test_a_reset_restarts_the_moments_and_their_bias_correction(name):
  """After a refresh with ``moments="reset"`` the moments hold only the new
  gradient, and the update is Adam's first step on it: ``alpha S N`` with
  ``N = R / (|R| + eps)`` (both bias corrections restart)."""
  tx = helpers.make_tx(name, learning_rate=1.0, rank=3, update_interval=2)
  shape = (12, 20)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  for g in _gradients(shape, 3, seed=8):  # steps 0, 1, then a refresh
    u, state = update({"w": g}, state, {"w": jnp.zeros(shape)})
  leaf = state[0].inner_states["subspace"].inner_state.matrices["w"]
  basis = subspax.DenseBasis(leaf.basis.s) if name == "rso" else leaf.basis
  reduced = np.asarray(basis.project(g), np.float64)
  np.testing.assert_allclose(leaf.mu, (1 - B1) * reduced, rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(leaf.nu, (1 - B2) * reduced**2, rtol=1e-5,
                             atol=1e-9)
  expected = basis.back(jnp.asarray(reduced / (np.abs(reduced) + EPS),
                                    jnp.float32), shape[0])
  # The alias chains the learning rate 1: the parameter moves by -U.
  np.testing.assert_allclose(-u["w"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["galore", "subtrack", "grasswalk",
                                  "grassjump", "rso", "grass"])
def test_the_basis_changes_only_at_refresh_steps(name):
  tx = helpers.make_tx(name, rank=3, update_interval=3)
  shape = (12, 20)
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  changed = []
  for g in _gradients(shape, 7, seed=9):
    before = state[0].inner_states["subspace"].inner_state.matrices["w"].basis
    _, state = update({"w": g}, state, {"w": jnp.zeros(shape)})
    after = state[0].inner_states["subspace"].inner_state.matrices["w"].basis
    changed.append(any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(after))))
  assert changed == [True, False, False, True, False, False, True], changed


@pytest.mark.parametrize("kind", ["rows", "dense"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_layer_mode_forward_and_delta_gradient_in_closed_form(kind, side):
  """``subspax.reparam.dense``: ``y = x (W + back(Delta))`` and
  ``dL/dDelta = project(x^T dy)`` (linear in Delta, so at any Delta), against
  float64 NumPy; the row scales are not 1, the delta is not 0."""
  m, n, r = 6, 9, 3
  keys = jax.random.split(jax.random.key(11), 4)
  d = m if side == "left" else n
  if kind == "rows":
    basis = subspax.RowBasis(jnp.array([4, 0, 2], jnp.int32),
                             jnp.array([0.5, 2.0, 1.5], jnp.float32))
    s = np.zeros((d, r))
    s[[4, 0, 2], [0, 1, 2]] = [0.5, 2.0, 1.5]
  else:
    s = np.linalg.qr(np.random.default_rng(0).normal(size=(d, r)))[0]
    basis = subspax.DenseBasis(jnp.asarray(s, jnp.float32))
  x = jax.random.normal(keys[0], (2, 5, m))
  w = jax.random.normal(keys[1], (m, n))
  delta = jax.random.normal(keys[2], subspax.reparam.delta_shape(m, n, r, side))
  dy = jax.random.normal(keys[3], (2, 5, n))
  x64, w64, delta64, dy64 = (np.asarray(a, np.float64)
                             for a in (x, w, delta, dy))
  full = s @ delta64 if side == "left" else (s @ delta64).T  # back(Delta)
  y = subspax.reparam.dense(x, w, delta, basis, side=side)
  np.testing.assert_allclose(y, x64 @ (w64 + full), rtol=1e-4, atol=1e-4)
  grad = jax.grad(lambda dl: jnp.sum(
      subspax.reparam.dense(x, w, dl, basis, side=side) * dy))(delta)
  g = np.einsum("blm,bln->mn", x64, dy64)
  expected = s.T @ (g if side == "left" else g.T)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)

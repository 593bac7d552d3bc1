"""Fira, APOLLO and APOLLO-Mini: the authors' updates, limiter, scaling modes.

The reference updates come from ``fixtures/reference_fixtures.npz``, written
by ``fixtures/make_reference_fixtures.py`` with the ``fira`` and
``apollo-torch`` packages (see that script for the shared settings).
"""

import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import subspax
from subspax import _apollo
from subspax import _policies

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" /
                   "reference_fixtures.npz")
CASES = sorted({key.split("/")[0] for key in FIXTURES if "/" in key})


def _case(name):
  return (json.loads(str(FIXTURES[f"{name}/config"])),
          FIXTURES[f"{name}/grads"], FIXTURES[f"{name}/updates"],
          FIXTURES[f"{name}/bases"])


def _reference_config(config):
  """subspax arguments equal to a reference case's settings."""
  common = dict(rank=config["rank"], update_interval=config["update_interval"],
                eps=0.0)
  if config["method"] == "fira":
    return _apollo.scale_by_fira, dict(common, scale=1.0,
                                       limiter="uncorrected")
  limiter = "off" if config["disable_nl"] else "uncorrected"
  kwargs = dict(common, limiter=limiter)
  if config["rank"] == 1 and config["scale_type"] == "tensor":
    assert config["scale"] == 128.0  # the paper's, subspax's default
    return _apollo.scale_by_apollo_mini, kwargs
  return _apollo.scale_by_apollo, dict(
      kwargs, scale_type=config["scale_type"],
      scale=math.sqrt(config["scale"]))  # apollo-torch applies sqrt(scale)


def _run_case(name, monkeypatch, **overrides):
  config, grads, _, bases = _case(name)
  factory, kwargs = _reference_config(config)
  if config["update_interval"] < len(grads):  # replay the recorded bases
    replayed = helpers.ReplayedSubspace(bases)
    monkeypatch.setattr(_policies, "SvdSubspace", lambda: replayed)
    monkeypatch.setattr(_policies, "RandomSubspace",
                        lambda orthonormal: replayed)
    if config["method"] == "apollo":  # a replayed basis must be stored
      kwargs["store_basis"] = True
  tx = factory(**{**kwargs, **overrides})
  state = tx.init({"w": jnp.zeros(grads.shape[1:])})
  update = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = update({"w": jnp.asarray(g)}, state)
    updates.append(u["w"])
  return np.stack(updates)


@pytest.mark.parametrize("name", CASES)
def test_matches_the_authors_update_step_for_step(name, monkeypatch):
  _, _, expected, _ = _case(name)
  np.testing.assert_allclose(_run_case(name, monkeypatch), expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fira_left", "apollo_channel_right"])
def test_the_reference_cases_exercise_the_limiter(name, monkeypatch):
  _, _, expected, _ = _case(name)
  unlimited = _run_case(name, monkeypatch, limiter="off")
  assert np.abs(unlimited - expected).max() > 1e-3


def _limited_norms(tx, shape, steps=6):
  """Update norms and limiter states under gradients growing 10x per step."""
  state = tx.init({"w": jnp.zeros(shape)})
  update = jax.jit(tx.update)
  norms, last = [], []
  for i in range(steps):
    g = {"w": 10.0**i * jax.random.normal(jax.random.key(i), shape)}
    u, state = update(g, state)
    norms.append(float(jnp.linalg.norm(u["w"])))
    last.append(float(state.inner_states["subspace"].inner_state
                      .matrices["w"].last_norm))
  return np.array(norms), np.array(last)


@pytest.mark.parametrize("factory", [_apollo.scale_by_apollo,
                                     _apollo.scale_by_apollo_mini])
@pytest.mark.parametrize("shape", [(16, 24), (24, 16)], ids=["left", "right"])
def test_limiter_bounds_the_growth_of_the_whole_update(factory, shape):
  tx = factory(rank=1, update_interval=2, recovery_limit=1.01)
  norms, last = _limited_norms(tx, shape)
  assert np.all(norms[1:] / norms[:-1] <= 1.01 * (1 + 1e-5)), norms
  assert np.all(last[1:] / last[:-1] <= 1.01 * (1 + 1e-5)), last


def test_fira_limiter_bounds_the_recovery_term_in_both_conventions():
  for limiter in ("corrected", "uncorrected"):
    tx = _apollo.scale_by_fira(rank=2, update_interval=100, limiter=limiter)
    _, last = _limited_norms(tx, (16, 24))
    assert np.all(last[1:] / last[:-1] <= 1.01 * (1 + 1e-5)), (limiter, last)


def test_tensor_scaling_equals_channel_scaling_with_one_channel():
  params = {"w": jnp.zeros((8, 1))}  # side "left": D = 1 kept column
  results = []
  for scale_type in ("channel", "tensor"):
    tx = _apollo.scale_by_apollo(rank=2, update_interval=2, key=3,
                                 scale_type=scale_type, side="left",
                                 projected=True)
    state, update = tx.init(params), jax.jit(tx.update)
    for i in range(4):
      u, state = update(
          {"w": jax.random.normal(jax.random.key(i), (8, 1))}, state)
    results.append(u)
  chex.assert_trees_all_close(*results, rtol=1e-6)


def test_tensor_scaling_is_one_ratio_of_frobenius_norms():
  """First step: N = R / |R| elementwise, so s = ||sign(R)||_F / ||R||_F."""
  g = jax.random.normal(jax.random.key(0), (6, 10))
  tx = _apollo.scale_by_apollo(rank=3, update_interval=5, key=1,
                               scale_type="tensor", eps=0.0, store_basis=True)
  state = tx.init({"w": g})
  u, state = tx.update({"w": g}, state)
  s = state.inner_states["subspace"].inner_state.matrices["w"].basis.s
  reduced = s.T @ g
  expected = math.sqrt(reduced.size) / (jnp.linalg.norm(reduced) + 1e-8)
  chex.assert_trees_all_close(u["w"], expected * g, rtol=1e-5)


def test_apollo_update_is_the_gradient_scaled_per_channel():
  g = jax.random.normal(jax.random.key(0), (12, 5))  # right side: rows kept
  tx = _apollo.scale_by_apollo(rank=2, update_interval=5, key=1, eps=0.0)
  u, _ = tx.update({"w": g}, tx.init({"w": g}))
  ratio = u["w"] / g
  chex.assert_trees_all_close(ratio, jnp.broadcast_to(ratio[:, :1], g.shape),
                              rtol=1e-5)


def test_stored_and_regenerated_projections_agree():
  params = {"w": jnp.zeros((12, 20)), "v": jnp.zeros((2, 16, 8))}
  keyed = _apollo.scale_by_apollo(rank=3, update_interval=2, key=7)
  stored = _apollo.scale_by_apollo(rank=3, update_interval=2, key=7,
                                   store_basis=True)
  s1, s2 = keyed.init(params), stored.init(params)
  update1, update2 = jax.jit(keyed.update), jax.jit(stored.update)
  for i in range(5):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape),
                     params)
    u1, s1 = update1(g, s1)
    u2, s2 = update2(g, s2)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_apollo_mini_state_is_sgd_like():
  """Two D-vectors and one scalar per matrix: below 1% of AdamW's state."""
  m, n = 256, 1024
  params = {"w": jnp.zeros((m, n))}
  state = _apollo.scale_by_apollo_mini().init(params)
  matrices = state.inner_states["subspace"].inner_state.matrices
  assert subspax.state_bytes(matrices) == (2 * n + 1) * 4
  adam = subspax.state_bytes(optax.scale_by_adam().init(params))
  assert subspax.state_bytes(matrices) <= 0.01 * adam
  apollo = _apollo.scale_by_apollo(rank=32).init(params)
  assert subspax.state_bytes(
      apollo.inner_states["subspace"].inner_state.matrices) == (
          2 * 32 * n + 1) * 4  # 2 r D, no basis


def test_apollo_compiled_peak_is_below_the_back_projecting_methods():
  """No back-projection matmul: below GrassJump (keyed) and SubTrack++."""
  params = {"w": jnp.zeros((512, 512))}
  grads = {"w": jax.random.normal(jax.random.key(0), (512, 512))}

  def peak(tx):
    compiled = jax.jit(tx.update, donate_argnums=1).lower(
        grads, tx.init(params), params).compile()
    stats = compiled.memory_analysis()
    return stats.argument_size_in_bytes + stats.temp_size_in_bytes

  others = min(peak(subspax.grassjump(1e-3, rank=64, store_basis=False)),
               peak(subspax.subtrack(1e-3, rank=64)))
  assert peak(subspax.apollo(1e-3, rank=64)) < others
  assert peak(subspax.apollo_mini(1e-3)) < others


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale_type="row"), "scale_type must be one of"),
    (dict(limiter="before"), "limiter must be one of"),
    (dict(rank=0), "rank must be a positive int"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=message):
    subspax.apollo(1e-3, **kwargs)


def test_scaled_gradient_output_refuses_recovery():
  with pytest.raises(ValueError, match="set recovery=False"):
    subspax.scale_by_subspace_adam(
        subspax.RandomSubspace(), rank=2, output="scaled_gradient",
        recovery=True)

"""Sharded optimizer states on 8 fake CPU devices (see conftest.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import helpers
import subspax

SPECS = {
    "wide": P(None, "model"),  # (32, 64): left side, D = 64 on 'model'
    "tall": P("model", None),  # (64, 16): right side, D = 64 on 'model'
    "stack": P(None, None, "model"),  # (2, 16, 32)
    "bias": P(),
}


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  shapes = {"wide": (32, 64), "tall": (64, 16), "stack": (2, 16, 32),
            "bias": (64,)}
  return {k: jax.random.normal(key, shapes[k])
          for key, k in zip(keys, sorted(shapes))}


def _mesh(axis_type):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _run(tx, params, grads, steps, param_shardings=None):
  """Runs ``steps`` updates, sharded when ``param_shardings`` is given."""
  if param_shardings is None:
    state = tx.init(params)
    step = jax.jit(tx.update)
  else:
    params = jax.device_put(params, param_shardings)
    grads = jax.device_put(grads, param_shardings)
    state_shardings = subspax.state_shardings(tx, params, param_shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    step = jax.jit(tx.update,
                   in_shardings=(param_shardings, state_shardings,
                                 param_shardings),
                   out_shardings=(param_shardings, state_shardings),
                   donate_argnums=1)
  types = [jax.tree.map(jax.typeof, state)]
  for _ in range(steps):
    updates, state = step(grads, state, params)
    types.append(jax.tree.map(jax.typeof, state))
  return updates, state, types


def _matrices(state):
  return state[0].inner_states["subspace"].inner_state.matrices


@pytest.mark.parametrize("name", helpers.CORE)
def test_sharded_states_are_sharded_and_match_unsharded(name):
  mesh = _mesh(AxisType.Auto)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = helpers.make_tx(name, rank=4, update_interval=2, weight_decay=0.1)
  u_ref, state_ref, _ = _run(tx, params, grads, 3)
  u, state, types = _run(tx, params, grads, 3, shardings)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=2e-5)
  chex.assert_trees_all_close(jax.device_get(state), state_ref, rtol=1e-4,
                              atol=1e-5)
  assert all(t == types[0] for t in types)
  for key in ("wide", "tall", "stack"):
    leaf = _matrices(state)[key]
    assert not leaf.mu.sharding.is_fully_replicated, key
    assert leaf.mu.sharding.spec[-1] == "model", (key, leaf.mu.sharding)
  assert _matrices(state)["wide"].mu.addressable_shards[0].data.shape == (4,
                                                                          16)


@pytest.mark.parametrize("quantize_moments", ["off", "quantile"])
def test_state_type_is_stable_on_an_explicit_mesh(quantize_moments):
  mesh = _mesh(AxisType.Explicit)
  params = _params()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = subspax.subtrack(1e-2, rank=4, update_interval=2,
                        quantize_moments=quantize_moments)
  with jax.set_mesh(mesh):
    _, state, types = _run(tx, params, params, 3, shardings)
  assert all(t == types[0] for t in types)
  mu = _matrices(state)["wide"].mu
  codes = mu if quantize_moments == "off" else mu.codes
  assert not codes.sharding.is_fully_replicated


def test_state_shardings_follow_params_for_plain_optax():
  mesh = _mesh(AxisType.Auto)
  params = _params()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2)
  state_shardings = subspax.state_shardings(tx, params, shardings)
  inner = state_shardings.inner_opt_state[0]
  assert inner.mu["wide"] == shardings["wide"]
  assert state_shardings.acc_grads["tall"] == shardings["tall"]
  assert inner.count.is_fully_replicated


@pytest.mark.parametrize("name", ["subtrack", "grass"])
def test_eight_bit_moments_shard_with_their_blocks(name):
  """Codes shard like ``mu``; block scales along ``D`` when the mesh divides
  their block axis (1024 / 256 = 4 blocks on 4 'model' devices), else they
  are replicated. Sharded runs match unsharded ones up to a code's rounding."""
  mesh = _mesh(AxisType.Auto)
  keys = jax.random.split(jax.random.key(1), 2)
  params = {"wide": jax.random.normal(keys[0], (128, 1024)),
            "tall": jax.random.normal(keys[1], (64, 16))}
  specs = {"wide": P(None, "model"), "tall": P("model", None)}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
  tx = helpers.make_tx(name, rank=4, update_interval=2,
                       quantize_moments="quantile")
  u_ref, state_ref, _ = _run(tx, params, grads, 3)
  u, state, types = _run(tx, params, grads, 3, shardings)
  assert all(t == types[0] for t in types)
  wide, tall = _matrices(state)["wide"], _matrices(state)["tall"]
  for moment in (wide.mu, wide.nu):
    assert moment.codes.sharding.spec[-1] == "model"
    assert moment.scales.sharding.spec[-1] == "model"
    assert moment.codes.addressable_shards[0].data.shape == (4, 256)
    assert moment.scales.addressable_shards[0].data.shape == (4, 1)
  assert tall.mu.codes.sharding.spec[-1] == "model"
  assert tall.mu.scales.sharding.spec[-1] is None  # 1 block: replicated
  matrices_ref = _matrices(state_ref)
  for key in params:
    for field in ("mu", "nu"):
      moment = getattr(_matrices(state)[key], field)
      moment_ref = getattr(matrices_ref[key], field)
      assert np.mean(np.asarray(moment.codes != moment_ref.codes)) < 1e-2
      stored = lambda m: (subspax.dequantize(m) if m.signed  # pylint: disable=cell-var-from-loop
                          else jnp.sqrt(subspax.dequantize(m)))  # nu: its root
      value_ref = np.asarray(stored(moment_ref))
      np.testing.assert_allclose(  # within one quantile level
          stored(moment), value_ref, rtol=0.06,
          atol=1e-3 * np.max(np.abs(value_ref)))
  chex.assert_trees_all_close(u, u_ref, rtol=0.07, atol=1e-4)  # one level


@pytest.mark.parametrize("rank, split", [(4, True), (6, False)])
def test_moments_split_their_rank_over_the_projected_dimensions_axes(rank, split):
  """FSDP shards a kernel along the dimension the projection removes: its
  (r, D) moments then split r over those devices (where they divide it)
  rather than each holding a copy, and the run is the unsharded one."""
  mesh = _mesh(AxisType.Auto)
  params = {k: v for k, v in _params().items() if k in ("wide", "tall")}
  specs = {"wide": P("model", None), "tall": P(None, "model")}  # d on 'model'
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
  tx = helpers.make_tx("subtrack", rank=rank, update_interval=2)
  u_ref, state_ref, _ = _run(tx, params, grads, 3)
  u, state, _ = _run(tx, params, grads, 3, shardings)
  for key in params:
    mu = _matrices(state)[key].mu
    assert mu.shape == (rank, 64)
    assert mu.sharding.spec[0] == ("model" if split else None), mu.sharding
    assert mu.addressable_shards[0].data.shape == ((rank // 4 if split else rank), 64)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=2e-5)
  chex.assert_trees_all_close(jax.device_get(state), state_ref, rtol=1e-4,
                              atol=1e-5)


def test_split_batch_places_activations_along_the_data_axes():
  from train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)
  split = jax.jit(lambda x: sharding_lib.split_batch(2.0 * x))
  with jax.set_mesh(mesh):
    out = split(jnp.ones((8, 3, 16)))
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert out.addressable_shards[0].data.shape == (1, 3, 16)
    # A batch the data axes do not divide is left to XLA.
    assert split(jnp.ones((6, 3, 16))).shape == (6, 3, 16)
  np.testing.assert_array_equal(split(jnp.ones((6, 3))), 2.0)  # no mesh: as is

"""The shared table: every method through the same generic optax checks.

jit == no jit, non-finite gradients and state stability are checked for every
method by the property kit (tests/test_testing_kit.py).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import subspax
from train import memory

ALL = sorted(helpers.METHODS)
CORE = helpers.CORE


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_param_dtype_and_state_is_float32(name, dtype):
  params = helpers.random_params(jax.random.key(0), dtype)
  tx = helpers.make_tx(name)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal_shapes(updates, params)
  matrices = state[0].inner_states["subspace"].inner_state.matrices
  for leaf in jax.tree.leaves(
      matrices, is_leaf=lambda x: isinstance(x, subspax.ProjectedState)):
    assert leaf.mu.dtype == jnp.float32 and leaf.nu.dtype == jnp.float32
  chex.assert_tree_all_finite(updates)


def _dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32",
                                   "float64"])
def test_every_param_dtype_round_trips_also_under_x64(name, dtype):
  """optax's rule, on every dtype (float64 with ``jax_enable_x64``, where a
  Python float to an int32 power is float64): updates come back in the
  parameter's dtype and the state's dtypes do not change across steps and
  refreshes (the row-block loops' carries keep their float32 type). Dtypes
  are fixed when the update is traced: ``jax.eval_shape`` checks them
  without compiling."""
  with jax.enable_x64(True):
    params = helpers.random_params(jax.random.key(9), jnp.dtype(dtype))
    tx = helpers.make_tx(name, update_interval=2)
    state = jax.eval_shape(tx.init, params)
    for _ in range(2):  # a refresh step, then the step after
      updates, new_state = jax.eval_shape(tx.update, params, state, params)
      assert _dtypes(updates) == _dtypes(params)
      assert _dtypes(new_state) == _dtypes(state)
      state = new_state


@pytest.mark.parametrize("name,extra", [(name, {}) for name in ALL] + [
    ("rso", {"prox": 0.0}), ("rso", {"prox": 1.0})])
def test_inject_hyperparams_keeps_the_state_fields(name, extra):
  """A hyperparameter that ``optax.inject_hyperparams`` turns into a traced
  array must not change which state fields exist (every numeric default of
  the signature is injected too). The values: tests/test_optax_battery.py."""
  factory, kwargs = helpers.METHODS[name]
  kwargs = dict(kwargs, learning_rate=1e-2, rank=4, update_interval=2,
                **extra)
  plain = factory(**kwargs)
  injected = optax.inject_hyperparams(
      factory, static_args=("rank", "update_interval"))(**kwargs)
  params = helpers.random_params(jax.random.key(10))
  plain_state = jax.eval_shape(plain.init, params)
  injected_state = jax.eval_shape(injected.init, params)
  chex.assert_trees_all_equal_structs(injected_state.inner_state, plain_state)
  _, plain_state = jax.eval_shape(plain.update, params, plain_state, params)
  _, injected_state = jax.eval_shape(injected.update, params, injected_state,
                                     params)
  chex.assert_trees_all_equal_structs(injected_state.inner_state, plain_state)


@pytest.mark.parametrize("name", CORE)
def test_state_types_survive_lax_cond(name):
  params = helpers.random_params(jax.random.key(3))
  tx = helpers.make_tx(name)
  state = tx.init(params)
  _, new_state = tx.update(params, state, params)
  chex.assert_trees_all_equal_structs(state, new_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
  picked = jax.jit(lambda flag: jax.lax.cond(flag, lambda: state,
                                             lambda: new_state))(True)
  chex.assert_trees_all_equal(picked, state)


@pytest.mark.parametrize("name", CORE)
def test_works_in_chain_multisteps_and_apply_if_finite(name):
  params = helpers.random_params(jax.random.key(4))
  grads = helpers.random_params(jax.random.key(5))
  tx = optax.chain(optax.clip_by_global_norm(1.0), helpers.make_tx(name))
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  tx = optax.apply_if_finite(tx, max_consecutive_errors=3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(grads, state, params)  # accumulating: zero update
  chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, params))
  updates, state = step(grads, state, params)
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = step(bad, state, params)
  assert int(state.notfinite_count) == 1
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", ALL)
def test_inject_hyperparams_with_static_rank_and_interval(name):
  factory, kwargs = helpers.METHODS[name]
  tx = optax.inject_hyperparams(
      factory, static_args=("rank", "update_interval"))(
          learning_rate=optax.linear_schedule(1e-2, 1e-3, 10), rank=4,
          update_interval=3, **kwargs)
  params = helpers.random_params(jax.random.key(6))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(4):
    updates, state = step(params, state, params)
  chex.assert_tree_all_finite(updates)
  assert float(state.hyperparams["learning_rate"]) < 1e-2


@pytest.mark.parametrize("name", ALL)
def test_lowers_least_squares_loss(name):
  loss, params = helpers.least_squares_problem(jax.random.key(7))
  tx = helpers.make_tx(name, learning_rate=0.1, rank=4, update_interval=20)
  _, _, losses = helpers.run(tx, loss, params, 150)
  assert losses[-1] < 0.6 * losses[0], losses[::15]


@pytest.mark.parametrize("name", CORE)
def test_lowers_two_layer_mlp_loss(name):
  kx, k1, k2 = jax.random.split(jax.random.key(8), 3)
  x = jax.random.normal(kx, (128, 16))
  y = jnp.sin(x @ jnp.linspace(-1, 1, 16))[:, None]
  params = {"w1": jax.random.normal(k1, (16, 64)) / 4, "b1": jnp.zeros(64),
            "w2": jax.random.normal(k2, (64, 32)) / 8, "w3": jnp.zeros((32, 1))}

  def loss(p):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"])
    h = jax.nn.gelu(h @ p["w2"])
    return jnp.mean(jnp.square(h @ p["w3"] - y))

  tx = helpers.make_tx(name, learning_rate=1e-2, rank=8, update_interval=10)
  _, _, losses = helpers.run(tx, loss, params, 200)
  assert losses[-1] < 0.5 * losses[0], losses[::20]


@pytest.mark.parametrize("name", CORE)
def test_state_bytes_match_the_documented_formula(name):
  m, n, r = 48, 96, 8  # left side: d = 48, D = 96
  params = {"w": jnp.zeros((m, n)), "b": jnp.zeros((n,))}
  tx = helpers.make_tx(name, rank=r)
  state = tx.init(params)
  adam_bias = subspax.state_bytes(optax.scale_by_adam().init(params["b"])) - 4
  d, big_d = min(m, n), max(m, n)
  moments = 2 * r * big_d * 4
  basis = {"grass": 2 * r * 4, "keyed": 0, "apollo": 0}.get(
      "keyed" if name == "grassjump_keyed" else name.split("_")[0], d * r * 4)
  extra = subspax.state_bytes(state) - moments - basis - adam_bias
  assert 0 <= extra <= 64 + 4 * r, extra  # counts, keys, ages, last norm
  matrices = state[0].inner_states["subspace"].inner_state.matrices
  chex.assert_shape([matrices["w"].mu, matrices["w"].nu], (r, big_d))


def test_compiled_peak_is_below_adam_and_optax_galore():
  """1024 x 1024 at rank 128 (the single-matrix case): the peak of train.memory.

  Gradients and state are donated, as in a train step (the README's optax
  example). With the gradients kept, XLA 0.12's Adam needs no temporary at
  all and a subspace update copies the gradient once: that case is measured
  by bench.update_memory and documented there, not asserted here.
  """
  params = {"w": jnp.zeros((1024, 1024))}
  grads = {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}

  def peak(tx):
    state = tx.init(params)
    compiled = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
        grads, state, params).compile()
    return memory.compiled_memory(compiled)["peak"]

  adam = peak(optax.adam(1e-3))
  contrib = peak(optax.contrib.galore(1e-3, rank=128))
  for name in ALL:
    if name.startswith("galore") or name == "fira":  # an SVD in the step
      continue
    assert peak(helpers.make_tx(name, rank=128, update_interval=200)) < min(
        adam, contrib), name

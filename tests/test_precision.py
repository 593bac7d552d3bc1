"""bfloat16 weights with stochastic rounding, and the moment dtypes of the
config (train/precision.py)."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import errors
from train import optimizers
from train import precision
from train import train


def _moments(state):
  """(name, leaf) of every leaf under a `mu` or `nu` field of an optax state."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    names = [getattr(k, "name", None) for k in path]
    found += [(n, leaf) for n in ("mu", "nu") if n in names]
  return found


def _states_dtypes(tx, params, grads):
  """The dtypes of tx's state after init and after one jitted update."""
  state = tx.init(params)
  _, new = jax.jit(tx.update)(grads, state, params)
  dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s)]
  return dtypes(state), dtypes(new), state


@pytest.mark.parametrize("name", ["adamw", "subtrack", "optax_galore"])
@pytest.mark.parametrize("param_dtype, nu_dtype", [
    (jnp.bfloat16, "float32"), (jnp.float32, "bfloat16")])
def test_nu_dtype_is_honoured_and_stable(name, param_dtype, nu_dtype):
  """optax keeps nu in the parameters' dtype; the trainer keeps opt.nu_dtype,
  for adamw, optax_galore and the Adam of what subspax does not project."""
  cfg = helpers.make_config({}, opt__name=name, opt__rank=2, opt__nu_dtype=nu_dtype,
                            opt__mu_dtype="bfloat16")
  params = {"w": jnp.ones((8, 16), param_dtype), "b": jnp.ones((16,), param_dtype)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
  before, after, state = _states_dtypes(
      optimizers.build(cfg.opt, 10, seed=0), params, grads)
  assert before == after
  moments = _moments(state)
  assert {"mu", "nu"} <= {name for name, _ in moments}
  for name, leaf in moments:
    assert leaf.dtype == (jnp.bfloat16 if name == "mu" else jnp.dtype(nu_dtype))


def test_default_moment_dtypes_leave_float32_states_unchanged():
  cfg = helpers.make_config({}, opt__name="adamw")
  params = {"w": jnp.ones((8, 16))}
  ours = optimizers.build(cfg.opt, 10, seed=0).init(params)
  plain = optax.adamw(optimizers.schedule(cfg.opt, 10)).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(plain)
  assert [x.dtype for x in jax.tree.leaves(ours)] == [
      x.dtype for x in jax.tree.leaves(plain)]


@pytest.mark.parametrize("overrides, message", [
    (dict(opt__stochastic_rounding=True),
     "opt.stochastic_rounding=True rounds updates to bfloat16 weights, but "
     "model.param_dtype='float32'"),
    (dict(opt__mu_dtype="float16"), "opt.mu_dtype must be 'float32' or 'bfloat16'"),
    (dict(opt__nu_dtype="int8"), "opt.nu_dtype must be 'float32' or 'bfloat16',"),
    (dict(opt__basis_dtype="int4"),
     "opt.basis_dtype must be 'float32' or 'bfloat16' or 'int8', got 'int4'"),
])
def test_bad_precision_fields_are_user_errors(overrides, message):
  cfg = helpers.make_config({}, **overrides)
  with pytest.raises(errors.UserError, match=message):
    train.validate(cfg)


def test_rounding_is_on_for_bfloat16_weights_only_by_default():
  cfg = helpers.make_config({})
  assert not precision.stochastic_rounding(cfg)
  cfg.model.param_dtype = "bfloat16"
  assert precision.stochastic_rounding(cfg)
  cfg.opt.stochastic_rounding = False
  assert not precision.stochastic_rounding(cfg)


def test_updater_keys_come_from_seed_and_step():
  cfg = helpers.make_config({}, model__param_dtype="bfloat16")
  params = {"blocks": {"w": jnp.ones((2, 64, 64), jnp.bfloat16)},
            "head": jnp.ones((64, 8), jnp.bfloat16)}
  updates = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3), params)
  update = jax.jit(precision.updater(cfg))
  a, b = update(params, updates, 3), update(params, updates, 3)
  c = update(params, updates, 4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert (a["head"] != c["head"]).any()
  cfg.seed = 1
  d = precision.updater(cfg)(params, updates, 3)
  assert (a["head"] != d["head"]).any()
  # One layer at a time (a layer-wise step) rounds as the whole step does.
  layer = precision.updater(cfg)(
      {"blocks": {"w": params["blocks"]["w"][1]}},
      {"blocks": {"w": updates["blocks"]["w"][1]}}, 3, layer=1)
  np.testing.assert_array_equal(layer["blocks"]["w"], d["blocks"]["w"][1])


@pytest.mark.slow
def test_bfloat16_run_trains_keeps_bfloat16_weights_and_float32_moments(
    corpus, tmp_path):
  cfg = helpers.make_config(corpus, steps=30, eval_every=0, checkpoint_every=30,
                            model__param_dtype="bfloat16")
  result = train.run(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in helpers.records(tmp_path).values()]
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  assert {x.dtype for x in jax.tree.leaves(result.state.params)} == {
      jnp.dtype(jnp.bfloat16)}
  moments = _moments(result.state.opt_state)
  assert moments and {x.dtype for _, x in moments} == {jnp.dtype(jnp.float32)}


def test_an_int8_basis_reaches_the_method():
  cfg = helpers.make_config({}, opt__name="subtrack", opt__basis_dtype="int8")
  train.validate(cfg)
  state = optimizers.build(cfg.opt, 10, seed=0).init(
      {"blocks": {"kernel": jnp.ones((64, 128))}})
  stored = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int8]
  assert [x.shape for x in stored] == [(64, cfg.opt.rank)], stored

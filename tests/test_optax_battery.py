"""optax's own generic optimizer tests, run on the nine methods.

The bodies of the tests are optax's, called from the installed package:
``optax.contrib._common_test.ContribTest`` (optax 0.2.8, Copyright 2023
DeepMind Technologies Limited, Apache-2.0). Each is called with optax's
optimizer lookup answering a subspax method at rank 1 and a short refresh
interval, so that the matrices of optax's targets (2 x 2, 2 x 3, a 2 x 5 x 2
stack) are projected. Its 1-D parabola, which no method would project, is
replaced by a 2 x 3 one; the tests whose parameters are written inside the
body (1-D: dtype preservation, gradient accumulation) run as they are, on the
methods' Adam part. ``test_mixed_dtype_input_outputs`` is vendored from
``optax/_src/float64_test.py`` (same copyright and license) with matrix
parameters.
"""

import functools
import inspect
import unittest

import jax
import jax.numpy as jnp
from optax._src import update as optax_update
from optax.contrib import _common_test as common
import pytest

import subspax

NAMES = sorted(subspax.METHODS)
# Rank 1 projects optax's 2 x n matrices (optax keeps `rank` static).
RANK = 1
# Refresh at steps 0, 2, ...: fixed, out of the signature (optax's list of
# static arguments names GaLore's `update_proj_gap`, not `update_interval`).
UPDATE_INTERVAL = 2


def _factory(name):
  """``subspax.<name>`` at RANK and UPDATE_INTERVAL, annotations evaluated.

  optax's tests read the signature (``inject_hyperparams`` injects every
  numeric default; the schedule test looks for ``optax.ScalarOrSchedule``).
  """
  method = subspax.METHODS[name]
  signature = inspect.signature(method, eval_str=True)
  signature = signature.replace(parameters=[
      p.replace(default=RANK) if p.name == "rank" else p
      for p in signature.parameters.values() if p.name != "update_interval"])

  @functools.wraps(method)
  def factory(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return method(**bound.arguments, update_interval=UPDATE_INTERVAL)

  factory.__signature__ = signature
  return factory


def _setup_parabola(dtype):
  """optax's parabola on a 2 x 3 matrix (projected at rank 1)."""
  initial = jnp.array([[-1.0, 10.0, 1.0], [2.0, 0.0, -3.0]], dtype=dtype)
  final = jnp.array([[1.0, -1.0, 1.0], [0.5, 2.0, -1.0]], dtype=dtype)
  return initial, final, lambda p: jnp.sum(jnp.square(p - final))


@pytest.fixture(name="battery")
def _battery(monkeypatch):
  """A ``ContribTest`` whose lookups answer subspax methods."""
  monkeypatch.setattr(common, "_get_opt_factory", _factory)
  monkeypatch.setattr(common, "_setup_parabola", _setup_parabola)
  monkeypatch.setattr(common, "_setup_rosenbrock", _setup_parabola)
  return common.ContribTest()


def _body(test_class, name):
  """The undecorated body of a parameterized optax test."""
  for attr in dir(test_class):
    if attr.startswith(name):
      return getattr(test_class, attr).__wrapped__
  raise AssertionError(f"optax has no test {name}")


def _call(battery, test, **kwargs):
  try:
    _body(common.ContribTest, test)(battery, **kwargs)
  except unittest.SkipTest as skip:
    pytest.skip(str(skip))


OPT = dict(opt_kwargs={"learning_rate": 1e-2}, wrapper_name=None,
           wrapper_kwargs=None)


@pytest.mark.parametrize("name", NAMES)
def test_optax_extra_args_and_no_recompile(battery, name):
  _call(battery, "test_optimizers_accept_extra_args", opt_name=name,
        wrap=False, **OPT)


@pytest.mark.parametrize("name", NAMES)
def test_optax_inject_hyperparams_gives_the_same_updates_and_state(
    battery, name):
  _call(battery, "test_optimizers_can_be_wrapped_in_inject_hyperparams",
        opt_name=name, **OPT)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_optax_preserve_dtype_and_gradient_accumulation(battery, name, dtype):
  _call(battery, "test_preserve_dtype", opt_name=name, dtype=dtype, **OPT)
  _call(battery, "test_gradient_accumulation", opt_name=name, dtype=dtype,
        **OPT)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32,
                                   jnp.float64])
def test_optax_state_shape_dtype_stability(battery, name, dtype):
  _call(battery, "test_state_shape_dtype_shard_stability", opt_name=name,
        dtype=dtype, **OPT)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_optax_learning_rate_schedule(battery, name):
  """Ten unjitted steps with a constant schedule and with a float."""
  _call(battery,
        "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_"
        "such", opt_name=name, **OPT)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", [
    "_setup_matrix_parabola",
    pytest.param("_setup_mixed_tensor_target", marks=pytest.mark.slow)])
def test_optax_optimizers_converge(battery, name, target):
  """30,000 steps of optax's convergence test on its matrix targets."""
  _call(battery, "test_optimizers", opt_name=name,
        target=getattr(common, target), dtype="float32", **OPT)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtype_input_outputs(name):
  """Vendored from optax's float64_test, with matrix parameters: under x64,
  float32 and float64 leaves keep their dtypes in the state and params."""
  dtypes = lambda tree: jax.tree.map(lambda t: t.dtype, tree)
  with jax.enable_x64(True):
    initial_params = (jnp.ones((2, 3), dtype=jnp.float32),
                      2 * jnp.ones((2, 3), dtype=jnp.float64))
    updates = (jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
               jnp.arange(6.0, dtype=jnp.float64).reshape(2, 3) + 30)
    scaler = _factory(name)(learning_rate=0.1)
    initial_state = jax.jit(scaler.init)(initial_params)
    updates, new_state = jax.jit(scaler.update)(
        updates, initial_state, params=initial_params)
    new_params = optax_update.apply_updates(initial_params, updates)
    assert dtypes(new_state) == dtypes(initial_state)
    assert dtypes(new_params) == dtypes(initial_params)

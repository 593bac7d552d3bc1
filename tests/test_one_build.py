"""One validation and one build of the optimizer per run.

`train.validate` checks the `opt` section by building the optimizer (the
method's factory checks its own options); the run, the dry run and the
benchmarks then use that transformation and build none. Counted here with a
factory that records its calls.
"""

import functools

import jax
import numpy as np
import pytest
import subspax

import helpers
from bench import gpu
from train import dry_run
from train import optimizers
from train import train


@pytest.fixture
def calls(monkeypatch):
  """Counts of `train.validate`, `optimizers.build` and subspax's factories."""
  counts = {"validate": 0, "build": 0, "factory": 0}

  def counted(name, fn):
    @functools.wraps(fn)  # keeps the signature (`optimizers.build` reads it)
    def wrapper(*args, **kwargs):
      counts[name] += 1
      return fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(train, "validate", counted("validate", train.validate))
  monkeypatch.setattr(optimizers, "build", counted("build", optimizers.build))
  monkeypatch.setattr(subspax, "METHODS", {
      name: counted("factory", fn) for name, fn in subspax.METHODS.items()})
  return counts


def test_validate_builds_the_runs_optimizer(calls):
  cfg = helpers.make_config({}, opt__name="grasswalk", seed=5)
  tx = train.validate(cfg)
  assert calls == {"validate": 1, "build": 1, "factory": 1}
  params = {"blocks": {"w": jax.ShapeDtypeStruct((2, 32, 32), np.float32)}}
  # The run's seed, not a trial seed: the same state as the run's own build.
  built = optimizers.build(cfg.opt, cfg.steps, cfg.seed)
  jax.tree.map(np.testing.assert_array_equal, tx.init(jax.tree.map(
      lambda s: np.ones(s.shape, s.dtype), params)), built.init(jax.tree.map(
          lambda s: np.ones(s.shape, s.dtype), params)))


def test_check_and_mesh_then_build_programs_build_once(calls):
  cfg = helpers.make_config({}, opt__name="galore")
  checked = train.check_and_mesh(cfg)
  programs = train.build_programs(cfg, cfg.data.vocab_size, checked.tx)
  assert calls == {"validate": 1, "build": 1, "factory": 1}
  assert programs.tx is checked.tx  # no clipping in the test preset


def test_the_gpu_benchmark_validates_and_builds_once(calls):
  gpu._programs(helpers.make_config({}, opt__name="subtrack"))  # pylint: disable=protected-access
  assert calls == {"validate": 1, "build": 1, "factory": 1}


@pytest.mark.slow
def test_a_dry_run_validates_and_builds_once(calls):
  dry_run.dry_run(helpers.make_config({}, opt__name="galore"))
  assert calls == {"validate": 1, "build": 1, "factory": 1}

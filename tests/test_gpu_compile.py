"""XLA's GPU compiler on a machine without a GPU (train/targets.py).

The test extra installs jax's CUDA plugin and ptxas (the `gpu-compile` extra),
so these compile for an H100 on CI's CPU-only machine.
"""

import doctest
import json
import os

import jax
import jax.numpy as jnp
import pytest

from train import control_flow
from train import errors
from train import targets
from tests import test_cli


def test_doctests():
  for module in (targets, control_flow):
    assert doctest.testmod(module).failed == 0, module.__name__


def test_parse_names_counts_and_files(tmp_path):
  assert targets.parse("h100x8") == targets.Target(
      "h100x8", os.path.join(targets.SPEC_DIR, "h100_sxm.txtpb"), 8)
  assert targets.parse("h200").count == 1
  assert not targets.parse("").is_gpu and targets.parse("cpu").cpu
  spec = tmp_path / "mine.txtpb"
  spec.write_text(open(targets.parse("a100_80").spec).read())
  assert targets.parse(f"{spec}x2") == targets.Target(f"{spec}x2", str(spec), 2)
  with pytest.raises(errors.UserError, match="unknown target"):
    targets.parse("h1000")
  with pytest.raises(errors.MissingFileError, match="no such spec file"):
    targets.parse(str(tmp_path / "missing.txtpb"))


@pytest.mark.parametrize("name", sorted(targets.SPECS))
def test_every_shipped_spec_parses(name):
  (device,) = targets.devices(targets.parse(name))
  assert device.platform == "gpu" and device.device_kind.startswith("NVIDIA")


def test_missing_extra_is_one_line(monkeypatch):
  monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(errors.UserError, match=r'gpu-compile'):
    targets.devices(targets.parse("h100"))


def test_counts_conditionals_inside_loops():
  def f(x, c):
    def step(x, _):
      inner = lambda x: jax.lax.cond(c > 1, jnp.sin, jnp.cos, x)
      return jax.lax.cond(c > 0, inner, jnp.cos, x), None
    return jax.lax.scan(step, x, None, length=3)[0]
  hlo = jax.jit(f).lower(jnp.ones(4), jnp.int32(1)).compile().as_text()
  stats = control_flow.count(hlo)
  assert stats["conditionals"] == 3 * 2  # the outer cond and the inner one, 3 times
  assert stats["while_trip_counts"] == [3]


@pytest.mark.slow
def test_tiny_preset_on_h100_subspax_below_adamw(tmp_path):
  """The tiny preset compiled for an H100: SubTrack++'s step peaks below
  AdamW's and synchronises with the host no more often."""
  records = {}
  for method in ("adamw", "subtrack"):
    workdir = tmp_path / method
    status, out = test_cli.run(tmp_path, "--config", "configs/tiny.py", "--dry_run",
                               "--target=h100", f"--config.opt.name={method}",
                               "--workdir", workdir)
    assert status == 0, out
    assert "XLA GPU compiler, NVIDIA H100 80GB HBM3 (deviceless)" in out
    records[method] = json.loads((workdir / "memory.json").read_text())
  for record in records.values():
    assert record["target"] == "h100" and record["platform"] == "gpu"
    assert record["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert record["device_count"] == 1
  adamw, subtrack = records["adamw"], records["subtrack"]
  assert subtrack["peak_bytes"] <= adamw["peak_bytes"]
  assert subtrack["state_bytes"] < adamw["state_bytes"]
  assert (subtrack["control_flow"]["conditionals"]
          <= adamw["control_flow"]["conditionals"])


def _ordinary_step_conditionals(**overrides) -> int:
  """Conditionals executed by the trainer's ordinary (non-refresh) train step
  of the test preset, compiled for an H100."""
  from train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from train import train as train_lib  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  cfg = helpers.make_config({}, mesh__data=1, **overrides)
  mesh, rules, tx = train_lib.check_and_mesh(cfg, targets.devices(targets.parse("h100")))
  programs = train_lib.build_programs(cfg, cfg.data.vocab_size, tx)
  shardings = train_lib.train_state_shardings(programs, mesh, rules)
  with jax.set_mesh(mesh):
    state = checkpoint_lib.abstract(jax.eval_shape(programs.init), shardings)
    jitted = train_lib.jit_programs(programs, shardings, mesh, cfg)
    compiled = jitted.train_step.lower(state, jitted.batch).compile()
  return control_flow.of_compiled(compiled)["conditionals"]


@pytest.mark.slow
def test_no_ordinary_step_synchronises_with_the_host_more_than_adamw():
  """On the GPU compiler, the ordinary step of every subspax method, both
  subspace-layer modes and the layer-wise step executes no more conditionals
  (host synchronisations) than AdamW's."""
  import subspax  # pylint: disable=g-import-not-at-top
  adamw = _ordinary_step_conditionals(opt__name="adamw")
  cases = [{"opt__name": name} for name in subspax.METHODS]
  cases += [{"opt__name": "grass", "opt__subspace_layers": True},
            {"opt__name": "rso", "opt__subspace_layers": True},
            {"opt__name": "subtrack", "opt__layerwise": True},
            {"opt__name": "grass", "opt__layerwise": True,
             "opt__subspace_layers": True}]
  counts = {str(case): _ordinary_step_conditionals(**case) for case in cases}
  assert all(n <= adamw for n in counts.values()), (adamw, counts)

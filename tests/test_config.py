"""The trainer's config schema: typed `opt.<method>` sections generated from
`subspax.METHODS`, their validation, and configs/ importing no trainer code."""

import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import subspax

from configs import base
from configs import test as test_preset
from train import errors
from train import model as model_lib
from train import optimizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_cfg(cfg):
  return model_lib.LlamaConfig.from_config(cfg.model, 320)


def test_configs_import_no_trainer_code():
  presets = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and f != "__init__.py")
  code = "; ".join([
      "import sys", *(f"import configs.{p}" for p in presets),
      *(f"configs.{p}.get_config()" for p in presets if p != "base"),
      "bad = sorted(m for m in sys.modules if m == 'train' or m.startswith('train.'))",
      "assert not bad, bad"])
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                 env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("name", list(subspax.METHODS))
def test_each_method_section_holds_its_keyword_options_with_their_defaults(name):
  section = base.get_base_config().opt[name]
  params = inspect.signature(subspax.METHODS[name]).parameters
  expected = {p.name: p.default for p in params.values()
              if p.kind == p.KEYWORD_ONLY and p.name not in (
                  "key", "projected", "mu_dtype", "nu_dtype", "basis_dtype",
                  "prox_learning_rate", "b1", "b2", "eps")}
  assert section.to_dict() == expected
  for key, option in base.method_options(name).items():
    assert option.default == expected[key]
    assert option.default is None or isinstance(option.default, option.field_type)


def test_literal_options_carry_their_choices():
  options = base.method_options("apollo")
  assert options["scale_type"].choices == ("channel", "tensor")
  assert options["limiter"].choices == ("corrected", "uncorrected", "off")
  assert base.method_options("rso")["orthonormal"].choices == ()


def test_an_optional_float_is_a_typed_placeholder():
  cfg = base.get_base_config()
  assert cfg.opt.subtrack.eta is None  # subspax.subtrack's own default
  cfg.opt.subtrack.eta = 5  # an int becomes the float field's value
  assert cfg.opt.subtrack.eta == 5.0 and isinstance(cfg.opt.subtrack.eta, float)
  with pytest.raises(TypeError):
    cfg.opt.subtrack.eta = "five"


@pytest.mark.slow
def test_build_passes_the_section_of_opt_name():
  """subtrack with opt.subtrack.step='angle', eta=0.5 updates exactly like
  subspax.subtrack with those options, and unlike the defaults."""
  cfg = test_preset.get_config()
  cfg.opt.update_interval, cfg.opt.rank = 1, 2
  cfg.opt.subtrack.step, cfg.opt.subtrack.eta = "angle", 0.5
  cfg.opt.grass.selection = "topk"  # another method's section: not read
  params = {"blocks": {"w": jnp.zeros((6, 8))}}  # the trainer projects blocks
  grads = [{"blocks": {"w": jax.random.normal(jax.random.key(i), (6, 8))}}
           for i in range(3)]

  def updates(tx):
    state, out, update = tx.init(params), [], jax.jit(tx.update)
    for g in grads:
      u, state = update(g, state, params)
      out.append(u["blocks"]["w"])
    return np.stack(out)

  ours = updates(optimizers.build(cfg.opt, 10, seed=3))
  lr = optimizers.schedule(cfg.opt, 10)
  expected = updates(subspax.subtrack(
      lr, rank=2, update_interval=1, key=3, step="angle", eta=0.5,
      b1=cfg.opt.b1, b2=cfg.opt.b2, eps=cfg.opt.eps))
  default = updates(subspax.subtrack(
      lr, rank=2, update_interval=1, key=3, b1=cfg.opt.b1, b2=cfg.opt.b2,
      eps=cfg.opt.eps))
  np.testing.assert_array_equal(ours, expected)
  assert not np.allclose(ours, default)


@pytest.mark.parametrize("name, key, value, message", [
    ("grass", "selection", "foo",
     "opt.grass.selection='foo' is not one of topk, multinomial, uniform"),
    ("apollo", "scale_type", "row",
     "opt.apollo.scale_type='row' is not one of channel, tensor"),
    ("subtrack", "etaa", 1.0,
     "opt.subtrack.etaa is not an option of opt.name='subtrack'; its options are"),
    ("subtrack", "recovery", "yes", "opt.subtrack.recovery='yes' must be a bool"),
    ("fira", "scale", True, "opt.fira.scale=True must be a float"),
    ("optax_galore", "scale", "big", "opt.optax_galore.scale='big' must be a float"),
])
def test_a_bad_option_names_the_field_and_the_accepted_values(name, key, value, message):
  cfg = test_preset.get_config()
  cfg.opt.name = name
  section = cfg.opt[name].to_dict()  # a preset may write any value
  section[key] = value
  cfg.opt[name] = ml_collections.ConfigDict(section)
  with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
    optimizers.validate(cfg.opt, _model_cfg(cfg), 10)


def test_options_of_other_methods_are_not_read():
  cfg = test_preset.get_config()
  cfg.opt.name = "galore"
  cfg.opt.subtrack = ml_collections.ConfigDict({"anything": "at all"})
  optimizers.validate(cfg.opt, _model_cfg(cfg), 10)
  assert optimizers.method_kwargs(cfg.opt) == {
      "scale": 0.25, "align_signs": False, "side": "auto", "quantize_moments": "off"}


def test_keyless_methods_come_from_the_signature():
  cfg = test_preset.get_config()
  for name in optimizers.NAMES:
    cfg.opt.name = name
    assert isinstance(optimizers.build(cfg.opt, 10, seed=0),
                      optax.GradientTransformation)
  assert "key" not in inspect.signature(subspax.galore).parameters


_SPY = """
import os, sys
os.environ.pop("OPENBLAS_NUM_THREADS", None)
seen = []

class Spy:  # records the OpenBLAS setting when numpy is first imported
  def find_spec(self, name, path=None, target=None):
    if name == "numpy" and not seen:
      seen.append(os.environ.get("OPENBLAS_NUM_THREADS"))

sys.meta_path.insert(0, Spy())
__import__(sys.argv[1])
assert seen == ["1"], seen
"""


@pytest.mark.slow
def test_every_entry_point_pins_openblas_before_numpy_loads():
  """`python -m train`, `-m train.export`, `-m train.generate` and
  `-m bench.<name>` import the
  `train` package (train/__init__.py) before anything imports numpy."""
  procs = [subprocess.Popen([sys.executable, "-c", _SPY, module], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for module in ("train.__main__", "train.export", "train.generate",
                          "bench.refresh")]
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def test_a_restart_compares_only_the_section_of_opt_name():
  from train import resume  # pylint: disable=g-import-not-at-top
  cfg = test_preset.get_config()
  saved = (5, resume.to_json(cfg))
  cfg.opt.grass.selection = "topk"  # not read by opt.name='subtrack'
  resume.check_config(saved, cfg)
  cfg.opt.subtrack.eta = 0.5
  with pytest.raises(errors.UserError, match=r"opt.subtrack.eta None -> 0.5"):
    resume.check_config(saved, cfg)


def test_the_trainer_projects_the_blocks_kernels_only():
  """LLaMA-7B's embedding and head (32000 x 4096) pass subspax's shape rule,
  but the trainer leaves them to Adam, as the papers do."""
  key = jax.tree_util.DictKey
  embedding = jax.ShapeDtypeStruct((32000, 4096), jnp.float32)
  kernel = jax.ShapeDtypeStruct((32, 4096, 11008), jnp.float32)
  assert subspax.default_is_projected(embedding.shape, 1024)
  assert not optimizers.is_projected((key("embed"), key("embedding")), embedding, 1024)
  assert not optimizers.is_projected((key("head"), key("kernel")), embedding.update(
      shape=(4096, 32000)), 1024)
  assert optimizers.is_projected((key("blocks"), key("mlp"), key("up"), key("kernel")),
                                 kernel, 1024)


def _projected_names(opt_cfg, model_cfg):
  shapes = model_lib.abstract_model(model_cfg)[1]
  rule = optimizers.projected(opt_cfg)
  return sorted(subspax.path_name(path) for path, p in
                jax.tree_util.tree_flatten_with_path(shapes)[0] if rule(path, p))


@pytest.mark.parametrize("scan", [True, False])
def test_opt_projected_attn_mlp_is_the_default_selection(scan):
  """`opt.projected="attn,mlp"` (optim_target_modules=["attn", "mlp"]) selects
  the blocks' seven kernels, as the default does; "attn.q,attn.v" two."""
  cfg = test_preset.get_config()
  cfg.model.scan = scan
  model_cfg = _model_cfg(cfg)
  default = _projected_names(cfg.opt, model_cfg)
  cfg.opt.projected = "attn,mlp"
  optimizers.validate(cfg.opt, model_cfg, 10)
  assert _projected_names(cfg.opt, model_cfg) == default
  assert len(default) == 7 * (1 if scan else cfg.model.n_layers)
  cfg.opt.projected = "attn.q,attn.v"
  assert [n.rsplit(".", 2)[-2] for n in _projected_names(cfg.opt, model_cfg)] == (
      ["q", "v"] * (1 if scan else cfg.model.n_layers))
  # The gradients the update overwrites in place are exactly the selected ones.
  shapes = model_lib.abstract_model(model_cfg)[1]
  over = optimizers.overwrites_gradient(optimizers.build(cfg.opt, 10, 0), shapes)
  assert sorted(subspax.path_name(path) for path, p in
                jax.tree_util.tree_flatten_with_path(shapes)[0]
                if over(path, p)) == _projected_names(cfg.opt, model_cfg)


@pytest.mark.parametrize("value, message", [
    ("atn", "opt.projected='atn' selects no matrix of the model; its matrices are "
     "blocks.attn.k.kernel"),
    ("re:(q", "opt.projected='re:(q': projected_by_name: 're:(q' is not a valid "
     "regular expression"),
    (3, "opt.projected must be a string of comma-separated names, got 3"),
])
def test_a_bad_opt_projected_is_one_line(value, message):
  cfg = test_preset.get_config()
  section = cfg.opt.to_dict()
  section["projected"] = value
  cfg.opt = ml_collections.ConfigDict(section)
  with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
    optimizers.validate(cfg.opt, _model_cfg(cfg), 10)


def test_opt_projected_rank_is_checked_on_the_selected_kernels():
  cfg = test_preset.get_config()
  cfg.opt.projected = "mlp"
  cfg.opt.rank = 32  # below mlp's 96 but not its d_model 32 side
  with pytest.raises(errors.UserError, match=r"opt.rank=32 .* \(mlp.down kernel"):
    optimizers.validate(cfg.opt, _model_cfg(cfg), 10)


def test_opt_projected_never_takes_a_scanned_norm_scale():
  """A scanned model's norm scales are (L, D): 2-D, but not weight matrices."""
  cfg = test_preset.get_config()
  cfg.opt.projected = "blocks"
  names = _projected_names(cfg.opt, _model_cfg(cfg))
  assert len(names) == 7 and all(n.endswith(".kernel") for n in names)


def test_opt_projected_is_checked_for_every_optimizer():
  """A bad pattern is an error under AdamW too (which projects nothing), and
  the subspace-layer modes choose their kernels themselves."""
  cfg = test_preset.get_config()
  cfg.opt.name, cfg.opt.projected = "adamw", "re:("
  with pytest.raises(errors.UserError, match="not a valid regular expression"):
    optimizers.validate(cfg.opt, _model_cfg(cfg), 10)
  cfg.opt.name, cfg.opt.projected, cfg.opt.subspace_layers = "grass", "attn", True
  with pytest.raises(errors.UserError, match="cannot be combined with "
                     "opt.subspace_layers=True"):
    optimizers.validate(cfg.opt, _model_cfg(cfg), 10)

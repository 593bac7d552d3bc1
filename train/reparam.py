"""GRASS sparse-gradient and RSO subspace-layer modes of the trainer.

`--config.opt.subspace_layers=True` with `--config.opt.name=grass` or
`--config.opt.name=rso` turns the attention and MLP kernels into
`model.SubspaceLinear` layers (`subspax.reparam`): each kernel `W` is frozen
between refreshes and trains through a reduced delta (r x D), so the ordinary
step computes, stores and (under data parallelism) reduces only r x D weight
gradients, and saves only the r-dimensional projection of a
layer's input for them. Every `opt.update_interval` steps a refresh program
(its own jitted function, run before that step):

1. merges every delta into its kernel (`W += back(Delta)`) and zeroes it;
2. chooses new bases: GRASS selects rows from the full gradient of the merged
   weights on the step's batch (the only program that ever materialises an
   m x n weight gradient); RSO draws a random basis from the seed;
3. resets the deltas' Adam moments.

Bases come from the same `subspax.RowSubspace` / `subspax.RandomSubspace`
policies and the same per-matrix keys as the plain `subspax.grass` /
`subspax.rso` transformations, so both modes reproduce those
transformations' weights (tests/test_reparam.py). The modes read their
options from the method's section, `opt.grass.{selection,replacement,side}`
and `opt.rso.{orthonormal,side,prox}`; rso's side "auto" means "left" here
(the RSO paper's r x D deltas), where `subspax.rso` projects the smaller side.

References:
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660;
  Chen et al., RSO, https://arxiv.org/abs/2502.07222
"""

from collections.abc import Callable
from typing import Any

import jax
import optax
import subspax
from flax import nnx

from configs import base as config_base
from train import errors
from train import model as model_lib
from train import optimizers
from train import precision

# opt.name -> model.reparam kind of its mode (opt.subspace_layers=True)
MODES = {"grass": "rows", "rso": "dense"}
# The options of opt.<name> each mode reads; the others must keep their default.
_MODE_OPTIONS = {"grass": ("selection", "replacement", "side"),
                 "rso": ("orthonormal", "side", "prox")}


def kind(opt_cfg: Any) -> str:
  """`model.reparam` for this `opt` section: "" (off), "rows" or "dense"."""
  if not opt_cfg.get("subspace_layers", False):
    return ""
  return MODES.get(opt_cfg.name, "")


def validate(opt_cfg: Any) -> None:
  """Rejects the mode on another method and options the modes do not read.

  Raises:
    UserError: naming the field and the fix.
  """
  if opt_cfg.get("subspace_layers", False) and opt_cfg.name not in MODES:
    raise errors.UserError(
        f"opt.subspace_layers=True is a mode of opt.name 'grass' or 'rso', not "
        f"{opt_cfg.name!r}; set opt.name='grass' or 'rso', or "
        "opt.subspace_layers=False")
  if not kind(opt_cfg):
    return
  if opt_cfg.weight_decay:
    raise errors.UserError(
        f"opt.weight_decay={opt_cfg.weight_decay}: the {opt_cfg.name} "
        "reparametrised mode keeps kernels frozen between refreshes, so it "
        "cannot decay them every step; set opt.weight_decay=0 (the papers' "
        "setting) or turn the mode off")
  name, reads = opt_cfg.name, _MODE_OPTIONS[opt_cfg.name]
  options = config_base.options(name)
  for key, value in optimizers.method_kwargs(opt_cfg).items():
    default = options[key].default
    if key not in reads and value != default:
      raise errors.UserError(
          f"opt.{name}.{key}={value!r} is not supported by the {name} "
          f"subspace-layer mode (it reads opt.{name}.{{{','.join(reads)}}}); "
          f"set opt.{name}.{key}={default!r} or opt.subspace_layers=False")


def _options(opt_cfg: Any) -> dict[str, Any]:
  """The mode's options, from opt.<name>; rso's side "auto" is "left" here."""
  options = optimizers.method_kwargs(opt_cfg)
  if opt_cfg.name == "rso" and options["side"] == "auto":
    options["side"] = "left"
  return options


def model_fields(opt_cfg: Any) -> dict[str, Any]:
  """The `LlamaConfig.reparam*` fields of this `opt` section ({} when off)."""
  reparam_kind = kind(opt_cfg)
  if not reparam_kind:
    return {}
  return {"reparam": reparam_kind, "reparam_rank": opt_cfg.rank,
          "reparam_side": side_option(opt_cfg)}


def delta_labels(graphdef: nnx.GraphDef, params: dict) -> dict:
  """"delta" or "other" for every trainable parameter, by variable type.

  Args:
    graphdef: The model's graph.
    params: The model's state (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    A tree of the structure of `model.trainable(graphdef, params)`.
  """
  deltas, others = model_lib.partition(
      graphdef, params, model_lib.SubspaceDelta, model_lib.TRAINABLE)
  return model_lib.combine(jax.tree.map(lambda _: "delta", deltas),
                           jax.tree.map(lambda _: "other", others))


def build_tx(opt_cfg: Any, steps: int,
             labels: dict) -> optax.GradientTransformation:
  """Adam on the deltas (reset at every refresh) and on the other parameters.

  The same chain as `subspax.grass` / `subspax.rso` with weight decay 0:
  Adam per group (`subspax.reparam.scale_by_delta_adam` for the deltas, so
  the refresh can reset it), then the shared learning-rate schedule. RSO's
  proximal term adds `opt.rso.prox * Delta` to the deltas' gradient.

  Args:
    opt_cfg: The `opt` section.
    steps: The run's length (for the schedule).
    labels: `delta_labels` of the model's parameters.
  """
  mu_dtype, nu_dtype = precision.moment_dtypes(opt_cfg)
  adam = dict(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, mu_dtype=mu_dtype)
  prox = _options(opt_cfg).get("prox") or 0.0  # None: off
  return subspax.with_moment_dtype(optax.chain(
      optax.partition(
          {"delta": subspax.reparam.scale_by_delta_adam(**adam, prox=prox),
           "other": optax.scale_by_adam(**adam)}, labels),
      optax.scale_by_learning_rate(optimizers.schedule(opt_cfg, steps))), nu_dtype)


def _set_path(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _subspace_modules(model: nnx.Module):
  """(path, layer) of every `model.SubspaceLinear`, in graph order."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, model_lib.SubspaceLinear)]


def layers(model: nnx.Module) -> dict:
  """Every reparametrised layer as a `subspax.reparam.SubspaceLayer`, placed
  at its kernel's path of the parameter dict: the layout the plain model's
  parameters have, so the library derives the keys the plain
  transformation's core derives for those kernels (subspax/_keys.py)."""
  tree = {}
  for path, module in _subspace_modules(model):
    _set_path(tree, tuple(path) + ("kernel",), module.layer())
  return tree


def set_layers(model: nnx.Module, tree: dict) -> None:
  """Sets every reparametrised layer of `model` from a `layers` tree."""
  for path, module in _subspace_modules(model):
    layer = tree
    for key in tuple(path) + ("kernel",):
      layer = layer[key]
    module.set_layer(layer)


def _merged_model(graphdef: nnx.GraphDef, params: dict,
                  side: str) -> nnx.Module:
  """The model with every delta folded into its kernel and zeroed."""
  model = nnx.merge(graphdef, params)
  set_layers(model, subspax.reparam.merge_layers(layers(model), side=side))
  return model


def merged_weights(graphdef: nnx.GraphDef, params: dict, side: str) -> dict:
  """The plain model's weights: every delta folded into its kernel.

  Args:
    graphdef: The reparametrised model's graph.
    params: Its parameters (with deltas and bases).
    side: The mode's side option (`side_option`; `LlamaConfig.reparam_side`).

  Returns:
    The `model.WEIGHTS` of the merged model, in the layout of a plain model
    of the same shape (`model.init_params` without `reparam`).
  """
  model = _merged_model(graphdef, params, side)
  return nnx.to_pure_dict(nnx.state(model, model_lib.WEIGHTS))


def side_option(opt_cfg: Any) -> str:
  """The projected-side option of the mode (grass: "auto", rso: "left")."""
  return _options(opt_cfg)["side"]


def subspace_policy(opt_cfg: Any) -> subspax.SubspacePolicy:
  """The mode's policy: GRASS's row selection or RSO's random basis."""
  options = _options(opt_cfg)
  if kind(opt_cfg) == "rows":
    return subspax.RowSubspace(selection=options["selection"],
                               replacement=options["replacement"])
  return subspax.RandomSubspace(orthonormal=options["orthonormal"])


def make_refresh(plain_loss: Callable[[dict, jax.Array], jax.Array],
                 graphdef: nnx.GraphDef, opt_cfg: Any, seed: int) -> Callable:
  """The refresh program: merge deltas, choose new bases, reset moments.

  Args:
    plain_loss: `(weights, batch) -> scalar`, the training loss of the plain
      model (ordinary kernels) on its `model.WEIGHTS`: the subspace layers
      freeze their kernels, so GRASS's full gradient is taken there.
    graphdef: The reparametrised model's graph.
    opt_cfg: The `opt` section (method, rank, interval, `opt.<method>`).
    seed: The run's seed, the key of the plain transformation
      (`subspax.reparam.refresh_bases` derives the per-matrix keys).

  Returns:
    `(state, batch) -> state` for a `TrainState`-like named tuple with
    `step`, `params` and `opt_state`; jit it with the state donated.
  """
  side, policy = side_option(opt_cfg), subspace_policy(opt_cfg)

  def kernel_gradients(model: nnx.Module, batch) -> dict:
    """d loss / d kernel of every reparametrised layer (the deltas are 0)."""
    kernels, rest = nnx.state(model, model_lib.FrozenKernel, model_lib.WEIGHTS)
    rest = nnx.to_pure_dict(rest)
    return jax.grad(lambda k: plain_loss(model_lib.combine(k, rest), batch))(
        nnx.to_pure_dict(kernels))

  def refresh(state, batch):
    model = _merged_model(graphdef, state.params, side)
    grads = kernel_gradients(model, batch) if kind(opt_cfg) == "rows" else None
    set_layers(model, subspax.reparam.refresh_bases(
        layers(model), policy, opt_cfg.update_interval, jax.random.key(seed),
        state.step, grads=grads, side=side))
    return state._replace(
        params=nnx.to_pure_dict(nnx.state(model)),
        opt_state=subspax.reparam.reset_moments(state.opt_state))

  return refresh

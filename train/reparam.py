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
import jax.numpy as jnp
import optax
import subspax

from configs import base as config_base
from train import errors
from train import optimizers

# opt.name -> model.reparam kind of its mode (opt.subspace_layers=True)
MODES = {"grass": "rows", "rso": "dense"}
# The options of opt.<name> each mode reads; the others must keep their default.
_MODE_OPTIONS = {"grass": ("selection", "replacement", "side"),
                 "rso": ("orthonormal", "side", "prox")}
BASIS_LEAVES = ("subspace_index", "subspace_scale", "subspace_basis")


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


def split(params: dict) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; frozen is {} for a plain model.

  Frozen: the kernels of reparametrised layers (siblings of a `delta`) and
  their bases; everything else, the deltas included, is trainable.
  """
  trainable, frozen = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      t, f = split(value)
      if t:
        trainable[key] = t
      if f:
        frozen[key] = f
    elif key in BASIS_LEAVES or (key == "kernel" and "delta" in params):
      frozen[key] = value
    else:
      trainable[key] = value
  return trainable, frozen


def combine(trainable: dict, frozen: dict) -> dict:
  """Inverse of `split`."""
  out = dict(trainable)
  for key, value in frozen.items():
    out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def model_weights(params: dict) -> dict:
  """The parameters without the deltas and bases (same as a plain model's tree
  when the deltas are merged: `model_weights(merge_all(params, side))`)."""
  drop = ("delta",) + BASIS_LEAVES
  return {k: model_weights(v) if isinstance(v, dict) else v
          for k, v in params.items() if k not in drop}


def _delta_labels(tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "delta" if path[-1].key == "delta" else "other", tree)


def build_tx(opt_cfg: Any, steps: int) -> optax.GradientTransformation:
  """Adam on the deltas (reset at every refresh) and on the other parameters.

  The same chain as `subspax.grass` / `subspax.rso` with weight decay 0:
  `scale_by_adam` per group, then the shared learning-rate schedule. RSO's
  proximal term adds `opt.rso.prox * Delta` to the deltas' gradient.
  """
  def adam():
    return optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)

  delta_tx = adam()
  prox = _options(opt_cfg).get("prox", 0.0)
  if prox:
    delta_tx = optax.chain(optax.add_decayed_weights(prox), adam())
  return optax.chain(
      optax.partition({"delta": delta_tx, "other": adam()}, _delta_labels),
      optax.scale_by_learning_rate(optimizers.schedule(opt_cfg, steps)))


def _reset_delta_moments(tx: optax.GradientTransformation, opt_state: Any,
                         trainable: dict) -> Any:
  """The optimizer state with the deltas' Adam state back at its init."""
  partition_state, schedule_state = opt_state
  fresh = tx.init(trainable)[0].inner_states["delta"]
  inner = {**partition_state.inner_states, "delta": fresh}
  return (partition_state._replace(inner_states=inner), schedule_state)


def _layers(params: dict, path: tuple = ()):
  """Yields (path, layer dict) of every reparametrised layer, in tree order."""
  if "delta" in params:
    yield path, params
    return
  for key in sorted(params):
    if isinstance(params[key], dict):
      yield from _layers(params[key], path + (key,))


def _get(tree: dict, path: tuple) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: dict) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _basis(layer: dict) -> Any:
  if "subspace_basis" in layer:
    return subspax.DenseBasis(layer["subspace_basis"])
  return subspax.RowBasis(layer["subspace_index"], layer["subspace_scale"])


def _with_basis(layer: dict, basis: Any) -> dict:
  if isinstance(basis, subspax.DenseBasis):
    return {**layer, "subspace_basis": basis.s}
  return {**layer, "subspace_index": basis.index, "subspace_scale": basis.scale}


def _flat(x: jax.Array, trailing: int) -> jax.Array:
  """Merges the leading (stacked-layer) axes into one."""
  return x.reshape((-1,) + x.shape[x.ndim - trailing:])


def _merged(layer: dict, side_option: str) -> dict:
  """One layer with its delta folded into the kernel (per stacked matrix)."""
  kernel, delta = layer["kernel"], layer["delta"]
  side = subspax.reparam.resolve_side(*kernel.shape[-2:], side_option)
  merge = lambda w, dl, b: subspax.reparam.merge(w, dl, b, side=side)
  nb = kernel.ndim - 2
  basis = jax.tree.map(lambda a: _flat(a, a.ndim - nb), _basis(layer))
  flat = jax.vmap(merge)(_flat(kernel, 2), _flat(delta, 2), basis)
  return {**layer, "kernel": flat.reshape(kernel.shape),
          "delta": jnp.zeros_like(delta)}


def merge_all(params: dict, side: str) -> dict:
  """Every delta folded into its kernel (`W += back(Delta)`) and zeroed.

  Args:
    params: The model's parameters (with deltas and bases).
    side: The mode's side option (`side_option`, see `model_fields`).

  Returns:
    Parameters of the same structure whose kernels are the effective weights.
  """
  for path, layer in list(_layers(params)):
    params = _set(params, path, _merged(layer, side))
  return params


def side_option(opt_cfg: Any) -> str:
  """The projected-side option of the mode (grass: "auto", rso: "left")."""
  return _options(opt_cfg)["side"]


def make_refresh(plain_loss: Callable[[dict, jax.Array], jax.Array],
                 tx: optax.GradientTransformation, opt_cfg: Any,
                 seed: int) -> Callable:
  """The refresh program: merge deltas, choose new bases, reset moments.

  Args:
    plain_loss: `(weights, batch) -> scalar`, the training loss of the plain
      model (ordinary kernels) on `model_weights(params)`: the subspace
      layers freeze their kernels, so GRASS's full gradient is taken there.
    tx: The mode's optimizer (`build_tx`).
    opt_cfg: The `opt` section (method, rank, interval, `opt.<method>`).
    seed: The run's seed; keys follow `subspax.scale_by_subspace_adam`'s
      derivation (seed -> projected leaf -> stacked matrix -> refresh epoch).

  Returns:
    `(state, batch) -> state` for a `TrainState`-like named tuple with
    `step`, `params` and `opt_state`; jit it with the state donated.
  """
  options = _options(opt_cfg)
  side_opt = options["side"]
  if kind(opt_cfg) == "rows":
    policy = subspax.RowSubspace(selection=options["selection"],
                                 replacement=options["replacement"])
  else:
    policy = subspax.RandomSubspace(orthonormal=options["orthonormal"])
  rank, interval = opt_cfg.rank, opt_cfg.update_interval

  def full_gradients(params: dict, layers: list, batch) -> list[jax.Array]:
    """d loss / d kernel of every reparametrised layer (the deltas are 0)."""
    weights = model_weights(params)

    def kernel_loss(kernels):
      full = weights
      for (path, _), kernel in zip(layers, kernels):
        full = _set(full, path, {**_get(full, path), "kernel": kernel})
      return plain_loss(full, batch)
    return jax.grad(kernel_loss)([layer["kernel"] for _, layer in layers])

  def new_bases(layer: dict, grad, key: jax.Array, step: jax.Array):
    """Per stacked matrix: a new basis from its key (and gradient)."""
    kernel = layer["kernel"]
    side = subspax.reparam.resolve_side(*kernel.shape[-2:], side_opt)
    d = kernel.shape[-2] if side == "left" else kernel.shape[-1]
    nb = kernel.ndim - 2
    old = jax.tree.map(lambda a: _flat(a, a.ndim - nb), _basis(layer))
    num = _flat(kernel, 2).shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(
        jax.random.fold_in(key, i), step // interval))(jnp.arange(num))
    if grad is None:
      new = jax.lax.map(lambda k: policy.sample(k, d, rank), keys)
    else:
      g = jax.vmap(lambda x: subspax.reparam.canonical(x, side))(
          _flat(grad.astype(jnp.float32), 2))

      def select(args):
        g_i, key_i, old_i = args
        new_i = policy.refresh(old_i, g_i, key_i, rank)
        finite = jnp.all(jnp.isfinite(g_i))
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_i, old_i)

      new = jax.lax.map(select, (g, keys, old))
    return jax.tree.map(lambda a, o: a.reshape(o.shape).astype(o.dtype),
                        new, _basis(layer))

  def refresh(state, batch):
    params = merge_all(state.params, side_opt)
    layers = list(_layers(params))
    grads = (full_gradients(params, layers, batch) if kind(opt_cfg) == "rows"
             else [None] * len(layers))
    base_key = jax.random.key(seed)
    for index, ((path, layer), grad) in enumerate(zip(layers, grads)):
      basis = new_bases(layer, grad, jax.random.fold_in(base_key, index),
                        state.step)
      params = _set(params, path, _with_basis(layer, basis))
    opt_state = _reset_delta_moments(tx, state.opt_state, split(params)[0])
    return state._replace(params=params, opt_state=opt_state)

  return refresh

"""GRASS sparse-gradient and RSO subspace-layer modes of the trainer.

`--config.opt.name=grass --config.opt.sparse_grads=True` and
`--config.opt.name=rso --config.opt.reparam=True` turn the attention and MLP
kernels into `model.SubspaceLinear` layers (`subspax.reparam`): each kernel
`W` is frozen between refreshes and trains through a reduced delta (r x D),
so the ordinary step computes, stores and (under data parallelism) reduces
only r x D weight gradients, and saves only the r-dimensional projection of a
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
transformations' weights (tests/test_reparam.py).

References:
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660;
  Chen et al., RSO, https://arxiv.org/abs/2502.07222
"""

import ast
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import subspax

from train import errors
from train import optimizers

# opt.name -> (the config flag that turns the mode on, model.reparam kind)
MODES = {"grass": ("sparse_grads", "rows"), "rso": ("reparam", "dense")}
# opt.kwargs each mode understands, with its default
_KWARGS = {
    "grass": {"selection": "multinomial", "replacement": False, "side": "auto"},
    "rso": {"orthonormal": True, "side": "left"},
}
BASIS_LEAVES = ("subspace_index", "subspace_scale", "subspace_basis")


def kind(opt_cfg: Any) -> str:
  """`model.reparam` for this `opt` section: "" (off), "rows" or "dense"."""
  for name, (flag, reparam_kind) in MODES.items():
    if opt_cfg.get(flag, False) and opt_cfg.name == name:
      return reparam_kind
  return ""


def validate(opt_cfg: Any) -> None:
  """Rejects a mode flag on the wrong method and options the modes lack.

  Raises:
    UserError: naming the field and the fix.
  """
  for name, (flag, _) in MODES.items():
    if opt_cfg.get(flag, False) and opt_cfg.name != name:
      raise errors.UserError(
          f"opt.{flag}=True is a mode of opt.name='{name}', not "
          f"{opt_cfg.name!r}; set opt.name='{name}' or opt.{flag}=False")
  if opt_cfg.get("prox", 0.0) and not kind(opt_cfg) == "dense":
    raise errors.UserError(
        f"opt.prox={opt_cfg.prox} is RSO's proximal term; it needs "
        "opt.name='rso' and opt.reparam=True (or set opt.prox=0)")
  if not kind(opt_cfg):
    return
  if opt_cfg.prox < 0:
    raise errors.UserError(f"opt.prox must be >= 0 (1 / eta_k), got {opt_cfg.prox}")
  if opt_cfg.weight_decay:
    raise errors.UserError(
        f"opt.weight_decay={opt_cfg.weight_decay}: the {opt_cfg.name} "
        "reparametrised mode keeps kernels frozen between refreshes, so it "
        "cannot decay them every step; set opt.weight_decay=0 (the papers' "
        "setting) or turn the mode off")
  unknown = set(_method_kwargs(opt_cfg)) - set(_KWARGS[opt_cfg.name])
  if unknown:
    raise errors.UserError(
        f"opt.kwargs {sorted(unknown)} are not supported by the {opt_cfg.name} "
        f"reparametrised mode (it takes {sorted(_KWARGS[opt_cfg.name])})")


def _method_kwargs(opt_cfg: Any) -> dict[str, Any]:
  return ast.literal_eval(opt_cfg.kwargs) if opt_cfg.kwargs else {}


def _options(opt_cfg: Any) -> dict[str, Any]:
  return {**_KWARGS[opt_cfg.name], **_method_kwargs(opt_cfg)}


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
  proximal term adds `opt.prox * Delta` to the deltas' gradient.
  """
  def adam():
    return optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)

  delta_tx = adam()
  if opt_cfg.get("prox", 0.0):
    delta_tx = optax.chain(optax.add_decayed_weights(opt_cfg.prox), adam())
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
    side: The mode's side option (`opt.kwargs['side']`, see `model_fields`).

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
    opt_cfg: The `opt` section (method, rank, interval, kwargs).
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

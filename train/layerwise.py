"""Layer-wise train step: each layer is updated inside the backward scan.

`--config.opt.layerwise=True` (scanned models) replaces the train step's
`value_and_grad` + `tx.update` by

1. a forward scan over the stacked blocks that keeps each block's input (the
   activations a rematerialised step keeps);
2. the loss and the gradient of the final norm and head (`Llama.logits`);
3. a reverse scan over the blocks: block `l`'s forward is recomputed, its
   vector-Jacobian product gives the gradient of its parameters and of its
   input, and its update is applied at once (`subspax.layerwise`), writing
   the new parameters and optimizer state of layer `l` into the donated
   buffers;
4. the embedding's gradient, and one update of every parameter outside the
   blocks (`update_rest`, which also advances the step counts).

So only one layer's gradient exists at a time, besides those of the
embedding, the final norm and the head. The result equals the ordinary step
(tests/test_layerwise.py): the same loss, gradients, updates and metrics; the
gradient norm is the root of the sum of the per-layer squares. Under a mesh,
each layer's gradient is reduced inside the scan (XLA partitions the scan
body like the rest of the step).

What reads the whole gradient before the update cannot be combined with it,
and `validate` refuses it: clipping by the global norm (`opt.clip_norm`) and
accumulating micro-batches (`grad_accum`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import subspax
from subspax import ordering
from flax import nnx

from train import errors
from train import model as model_lib
from train import reparam

BLOCKS = "blocks"  # the stacked (L, ...) parameters of a scanned model


def validate(cfg: Any) -> None:
  """Rejects `opt.layerwise=True` where it cannot work, every problem at once.

  Raises:
    UserError: naming the fields that conflict and the fix.
  """
  if not cfg.opt.get("layerwise", False):
    return
  fix = "or set opt.layerwise=False"

  def scanned():
    if not cfg.model.scan and cfg.opt.name != "optax_galore":
      raise errors.UserError(
          "opt.layerwise=True updates the stacked layers inside the backward "
          f"scan and needs model.scan=True; set model.scan=True {fix}")

  def projects_stacks():
    if cfg.opt.name == "optax_galore":
      raise errors.UserError(
          "opt.layerwise=True does not support opt.name='optax_galore' (it does "
          f"not project stacked layers); use opt.name='galore' {fix}")

  def no_clipping():
    if cfg.opt.get("clip_norm", 0.0):
      raise errors.UserError(
          f"opt.clip_norm={cfg.opt.clip_norm} clips by the norm of the whole "
          "gradient, which a layer-wise step never holds (each layer is updated "
          f"before the next one's gradient exists); set opt.clip_norm=0 {fix}")

  def no_accumulation():
    if cfg.get("grad_accum", 1) != 1:
      raise errors.UserError(
          f"grad_accum={cfg.grad_accum} sums micro-batch gradients before one "
          "update, but a layer-wise step updates each layer as soon as its "
          "gradient exists (it would step once per micro-batch); set "
          f"grad_accum=1 and raise batch_size instead, {fix}")

  errors.gather(scanned, projects_stacks, no_clipping, no_accumulation)


def _read_layer(stacks: Any, layer: jax.Array) -> Any:
  """Layer `layer` of stacked arrays, into buffers of its own.

  Sliced inside `subspax.ordering.read_first`: otherwise XLA's CPU compiler,
  which slices bfloat16 arrays in float32, converts a stack the scan only
  reads to float32 once, outside the loop (a float32 copy of every stacked
  bfloat16 weight); this way only the slice is read and converted. The train
  step reads the weights it writes without it (materialising a whole layer
  costs more than ordering the write after the reads, see `make_train_step`).
  """
  return ordering.read_first(
      stacks, layer, lambda t: jax.tree.map(lambda a: a[layer], t))


def _masked_like(tree: Any) -> Any:
  """A `MaskedNode` per parameter (an int8 kernel is one parameter)."""
  return jax.tree.map(lambda _: optax.MaskedNode(), tree,
                      is_leaf=model_lib.is_quantized)


# (params, updates, step, *, layer=None) -> params (`precision.updater`)
ApplyUpdates = Callable[..., Any]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr: optax.Schedule, param_shapes: dict,
                    apply_updates: ApplyUpdates, state_type: type,
                    refresh: bool | None = None) -> Callable:
  """The layer-wise (state, batch) -> (state, metrics) step.

  Args:
    graphdef: The (scanned) model's graph.
    tx: The optimizer, acting on `model.trainable` parameters.
    lr: Its learning-rate schedule (for the metrics).
    param_shapes: The parameters' `jax.ShapeDtypeStruct`s.
    apply_updates: `(params, updates, step, *, layer=None) -> params` for a
      part of the trainable tree, in its layout (`precision.updater`;
      `layer`: the blocks hold that layer only).
    state_type: The train state's type (`train.TrainState`).
    refresh: Passed to a subspax method's update (`train.make_train_step`).

  Returns:
    The step function; it equals `train.make_train_step`'s.
  """
  extra = {} if refresh is None else {"refresh": refresh}
  dtype = nnx.merge(graphdef, param_shapes).cfg.param_dtype
  # int8 kernels: the optimizer acts on the float weights they stand for.
  trainable_shapes = model_lib.as_float(
      model_lib.trainable(graphdef, param_shapes), dtype)
  lw = subspax.layerwise(tx, trainable_shapes,
                         {k: k == BLOCKS for k in trainable_shapes})
  block_graphdef = _block_graphdef(graphdef, param_shapes)

  def block_apply(params_l, x):
    return nnx.merge(block_graphdef, params_l)(x)

  def train_step(state, batch_BxL1: jax.Array):
    trainable, frozen = model_lib.partition(
        graphdef, state.params, model_lib.TRAINABLE, ...)
    blocks = trainable.pop(BLOCKS)
    frozen_blocks = frozen.pop(BLOCKS, {})
    rest = trainable
    model = lambda r: nnx.merge(graphdef, model_lib.combine(
        r, {BLOCKS: model_lib.combine(blocks, frozen_blocks)}, frozen))
    tokens_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]

    x_BxLxD, embed_vjp = jax.vjp(lambda r: model(r).embed_tokens(tokens_BxL),
                                 rest)

    x_BxLxD, inputs = _forward(block_apply, model_lib.combine(
        blocks, frozen_blocks), x_BxLxD)
    loss, head_vjp = jax.vjp(
        lambda r, x: _cross_entropy(model(r).logits(x), targets_BxL),
        rest, x_BxLxD)
    head_grads, dx = head_vjp(jnp.ones((), loss.dtype))
    masked_rest = _masked_like(rest)

    def backward(carry, layer):
      dx, blocks, opt_state, sq = carry
      x_l, frozen_l = _read_layer((inputs, frozen_blocks), layer)
      params_l = jax.tree.map(lambda a: a[layer], blocks)
      # int8 kernels (model.kernel_format): differentiated and updated as the
      # float weights they stand for, this layer's only; re-quantized below.
      weights_l = model_lib.as_float(params_l, dtype)
      _, vjp = jax.vjp(
          lambda p, x: block_apply(model_lib.combine(p, frozen_l), x),
          weights_l, x_l)
      grads_l, dx = vjp(dx)
      sq = sq + optax.tree.norm(grads_l, squared=True)
      updates_l, opt_state = lw.update_layer(
          {**masked_rest, BLOCKS: grads_l}, opt_state,
          {**masked_rest, BLOCKS: weights_l}, layer, **extra)
      new_l = apply_updates({BLOCKS: params_l}, {BLOCKS: updates_l[BLOCKS]},
                            state.step, layer=layer)[BLOCKS]
      # The layer's weights are written after dx exists: every read of them
      # (dx's included) is then done, and XLA keeps no copy of the stack.
      new_l = ordering.run_after(new_l, dx, layer)
      blocks = _write_layer(blocks, new_l, layer)
      return dx, blocks, opt_state, sq

    dx, blocks, opt_state, sq = _backward(
        backward, (dx, blocks, state.opt_state, jnp.zeros((), jnp.float32)))
    embed_grads, = embed_vjp(dx)
    rest_grads = jax.tree.map(jnp.add, head_grads, embed_grads)
    sq = sq + optax.tree.norm(rest_grads, squared=True)
    masked_blocks = _masked_like(blocks)
    rest_updates, opt_state = lw.update_rest(
        {**rest_grads, BLOCKS: masked_blocks}, opt_state,
        {**rest, BLOCKS: masked_blocks}, **extra)
    del rest_updates[BLOCKS]
    rest = apply_updates(rest, rest_updates, state.step)
    params = model_lib.combine(rest, {BLOCKS: blocks}, frozen,
                               {BLOCKS: frozen_blocks})
    metrics = {"train/loss": loss, "train/grad_norm": jnp.sqrt(sq),
               "lr": lr(state.step)}
    return state_type(state.step + 1, params, opt_state), metrics

  return train_step


def make_refresh(graphdef: nnx.GraphDef, param_shapes: dict,
                 plain_graphdef: nnx.GraphDef, plain_shapes: dict, opt_cfg: Any,
                 seed: int) -> Callable:
  """GRASS's refresh (train/reparam.py), one layer at a time.

  The same program as `reparam.make_refresh` (merge every delta, select new
  rows from the full gradient of the merged weights, reset the deltas'
  moments), but the gradient of each layer's merged kernels is computed in a
  backward scan and used at once: no full-size gradient of the model exists,
  and each layer is merged as its turn comes.

  Args:
    graphdef: The reparametrised model's graph.
    param_shapes: Its parameters' `jax.ShapeDtypeStruct`s.
    plain_graphdef: The graph of the same model without subspace layers.
    plain_shapes: Its parameters' shapes.
    opt_cfg: The `opt` section (grass, `opt.subspace_layers=True`).
    seed: The run's seed (the key of the bases).

  Returns:
    `(state, batch) -> state`; it equals `reparam.make_refresh`'s.
  """
  side, policy = reparam.side_option(opt_cfg), reparam.subspace_policy(opt_cfg)
  block_graphdef = _block_graphdef(graphdef, param_shapes)
  plain_block_graphdef = _block_graphdef(plain_graphdef, plain_shapes)
  is_layer = lambda x: isinstance(x, subspax.reparam.SubspaceLayer)

  def refresh(state, batch_BxL1: jax.Array):
    params = dict(state.params)
    blocks = params.pop(BLOCKS)
    model = nnx.merge(graphdef, {**params, BLOCKS: blocks})
    x_BxLxD = model.embed_tokens(batch_BxL1[:, :-1])
    x_BxLxD, inputs = _forward(
        lambda p, x: nnx.merge(block_graphdef, p)(x), blocks, x_BxLxD)
    dx = jax.grad(lambda x: _cross_entropy(model.logits(x), batch_BxL1[:, 1:]))(
        x_BxLxD)

    def backward(carry, layer):
      dx, blocks = carry
      block = nnx.merge(block_graphdef, _read_layer(blocks, layer))
      reparam.set_layers(block, subspax.reparam.merge_layers(
          reparam.layers(block), side=side))
      weights = nnx.to_pure_dict(nnx.state(block, model_lib.WEIGHTS))
      _, vjp = jax.vjp(lambda w, x: nnx.merge(plain_block_graphdef, w)(x),
                       weights, _read_layer(inputs, layer))
      grads, dx = vjp(dx)
      layers = reparam.layers(block)
      kernel_grads = jax.tree_util.tree_map_with_path(
          lambda path, _: _at(grads, path), layers, is_leaf=is_layer)
      one = lambda tree: jax.tree.map(lambda a: a[None], tree)
      new = subspax.reparam.refresh_bases(
          one(layers), policy, opt_cfg.update_interval, jax.random.key(seed),
          state.step, grads=one(kernel_grads), side=side, layer=layer)
      reparam.set_layers(block, jax.tree.map(lambda a: a[0], new))
      return dx, _write_layer(blocks, nnx.to_pure_dict(nnx.state(block)), layer)

    _, blocks = _backward(backward, (dx, blocks))
    return state._replace(
        params={**params, BLOCKS: blocks},
        opt_state=subspax.reparam.reset_moments(state.opt_state))

  return refresh


def _at(tree: Any, path: tuple) -> Any:
  """The subtree of nested dicts `tree` at a key path."""
  for key in path:
    tree = tree[key.key]
  return tree


def _cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, targets_BxL).mean()


def _forward(block_apply: Callable, stacked: dict, x_BxLxD: jax.Array):
  """The forward scan over the blocks: (last output, every block's input)."""
  num_layers = jax.tree.leaves(stacked)[0].shape[0]

  def forward(x, layer):
    return block_apply(_read_layer(stacked, layer), x), x

  return jax.lax.scan(forward, x_BxLxD, jnp.arange(num_layers))


def _backward(body: Callable, carry: Any) -> Any:
  """`carry = body(carry, layer)` for the layers from the last to the first;
  the number of layers is that of the stacked `carry[1]`."""
  num_layers = jax.tree.leaves(carry[1])[0].shape[0]
  return jax.lax.scan(lambda c, layer: (body(c, layer), None), carry,
                      jnp.arange(num_layers), reverse=True)[0]


def _write_layer(stacks: Any, layer_values: Any, layer: jax.Array) -> Any:
  """`stacks` with layer `layer` replaced (in place in a donated buffer)."""
  return jax.tree.map(
      lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype),
                                                       layer, 0),
      stacks, layer_values)


def _block_graphdef(graphdef: nnx.GraphDef, param_shapes: dict) -> nnx.GraphDef:
  """The graph of one block of the scanned model (its parameters unstacked)."""
  return nnx.split(nnx.merge(graphdef, param_shapes).blocks)[0]

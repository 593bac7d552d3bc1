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
and `validate` refuses it: clipping by the global norm (`opt.clip_norm`).
Micro-batches (`grad_accum`) are accumulated in the reduced space instead
(`make_accumulating_step`, at the end of this file).
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

  errors.gather(scanned, projects_stacks, no_clipping,
                lambda: validate_accumulation(cfg))


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
  lw, block_apply = _layer_updates(graphdef, tx, param_shapes)

  def train_step(state, batch_BxL1: jax.Array):
    blocks, frozen_blocks, rest, frozen = _split_blocks(graphdef, state.params)
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


def _layer_updates(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   param_shapes: dict) -> tuple[Any, Callable]:
  """`subspax.layerwise`'s calls of `tx` over the stacked blocks, and the
  function `(one layer's params, x) -> block(x)`. The optimizer acts on the
  float weights that int8 kernels stand for."""
  dtype = nnx.merge(graphdef, param_shapes).cfg.param_dtype
  trainable_shapes = model_lib.as_float(
      model_lib.trainable(graphdef, param_shapes), dtype)
  lw = subspax.layerwise(tx, trainable_shapes,
                         {k: k == BLOCKS for k in trainable_shapes})
  block_graphdef = _block_graphdef(graphdef, param_shapes)
  return lw, lambda params_l, x: nnx.merge(block_graphdef, params_l)(x)


def _split_blocks(graphdef: nnx.GraphDef, params: dict) -> tuple[dict, ...]:
  """`(trainable blocks, frozen blocks, other trainable, other frozen)`."""
  trainable, frozen = model_lib.partition(graphdef, params,
                                          model_lib.TRAINABLE, ...)
  return trainable.pop(BLOCKS), frozen.pop(BLOCKS, {}), trainable, frozen


def _block_graphdef(graphdef: nnx.GraphDef, param_shapes: dict) -> nnx.GraphDef:
  """The graph of one block of the scanned model (its parameters unstacked)."""
  return nnx.split(nnx.merge(graphdef, param_shapes).blocks)[0]


# --- Micro-batches accumulated in the reduced space (`grad_accum` > 1) ------

# Methods whose update reads the full gradient of the whole batch, not only
# its reduced gradient: APOLLO's scaled gradient (and Fira's recovery, a
# `recovery` option of its own section).
SCALED_GRADIENT = ("apollo", "apollo_mini")


def validate_accumulation(cfg: Any) -> None:
  """Rejects `grad_accum` > 1 with `opt.layerwise=True` where the reduced-space
  accumulation is not exact (the update reads the full gradient).

  Raises:
    UserError: naming the field and the fix.
  """
  k = cfg.get("grad_accum", 1)
  if k == 1 or not cfg.opt.get("layerwise", False):
    return
  name, fix = cfg.opt.name, "or set grad_accum=1"
  if cfg.opt.get("subspace_layers", False):
    return  # the deltas' gradients are reduced already: plain accumulation
  section = cfg.opt.get(name, {})
  if name in SCALED_GRADIENT:
    raise errors.UserError(
        f"grad_accum={k} with opt.layerwise=True accumulates reduced gradients, "
        f"but opt.name='{name}' scales the full gradient of the whole batch; "
        f"use a projected method (galore, grass, rso, ...) {fix}")
  if name == "fira" or section.get("recovery", False):
    field, change = (("opt.name='fira'", "use opt.name='galore'")
                     if name == "fira" else
                     (f"opt.{name}.recovery=True",
                      f"set opt.{name}.recovery=False"))
    raise errors.UserError(
        f"grad_accum={k} with opt.layerwise=True accumulates reduced gradients, "
        f"but {field} adds the residual of the whole batch's full gradient; "
        f"{change} {fix}")
  if not section.get("store_basis", True):
    raise errors.UserError(
        f"grad_accum={k} with opt.layerwise=True projects each micro-batch on "
        f"the stored bases, but opt.{name}.store_basis=False; set "
        f"opt.{name}.store_basis=True {fix}")


def first_micro_batch(batch_BxL1: jax.Array, micro_batches: int) -> jax.Array:
  """Micro-batch 0 of a batch (rows 0, k, 2k, ...: `train`'s split)."""
  return batch_BxL1[::micro_batches]


def make_accumulating_step(graphdef: nnx.GraphDef,
                           tx: optax.GradientTransformation,
                           lr: optax.Schedule, param_shapes: dict,
                           apply_updates: ApplyUpdates, state_type: type,
                           micro_batches: int,
                           refresh: bool | None = None) -> Callable:
  """The layer-wise step of `micro_batches` micro-batches, one update.

  Each micro-batch runs the forward pass and the layer-wise backward scan;
  per layer, the scan adds the layer's reduced gradients (`S^T G`, GRASS:
  its selected rows; `LayerwiseUpdate.reduce_layer`) and the full gradients
  of its unprojected leaves (norms) into accumulators, and the micro-batch
  adds the gradients of the embedding, final norm and head (every accumulator
  in its parameter's dtype, as `train.make_train_step` accumulates). On a refresh
  step, the first micro-batch's backward scan refreshes each layer's
  subspaces from that micro-batch's gradient before projecting it. After the
  last micro-batch, a scan over the layers takes the one optimizer step of
  each layer from the mean of its accumulators, then of the rest: one step
  count and one schedule step per batch.

  The micro-batches are those of `train.make_train_step` (rows j, j + k, ...);
  the result equals that step's for the methods whose update reads only the
  reduced gradient, given the same subspaces (tests/test_accumulation.py).
  The metric `train/reduced_grad_norm` is the norm of the accumulated
  quantities (reduced gradients and the other leaves' gradients): the full
  gradient's norm needs the full gradient, which never exists.

  Args:
    graphdef, tx, lr, param_shapes, apply_updates, state_type, refresh: As
      for `make_train_step`.
    micro_batches: `grad_accum`, at least 2; the batch size is a multiple.

  Returns:
    The step function `(state, batch) -> (state, metrics)`.
  """
  extra = {} if refresh is None else {"refresh": refresh}
  k = micro_batches
  lw, block_apply = _layer_updates(graphdef, tx, param_shapes)

  def train_step(state, batch_BxL1: jax.Array):
    blocks, frozen_blocks, rest, frozen = _split_blocks(graphdef, state.params)
    stacked = model_lib.combine(blocks, frozen_blocks)
    model = lambda r: nnx.merge(graphdef, model_lib.combine(
        r, {BLOCKS: stacked}, frozen))
    masked_rest = _masked_like(rest)
    b, length = batch_BxL1.shape
    parts = batch_BxL1.reshape(b // k, k, length).swapaxes(0, 1)

    def micro_batch(carry, part_BxL1, first):
      opt_state, acc_blocks, acc_rest, loss_sum = carry
      tokens_BxL, targets_BxL = part_BxL1[:, :-1], part_BxL1[:, 1:]
      x_BxLxD, embed_vjp = jax.vjp(
          lambda r: model(r).embed_tokens(tokens_BxL), rest)
      x_BxLxD, inputs = _forward(block_apply, stacked, x_BxLxD)
      loss, head_vjp = jax.vjp(
          lambda r, x: _cross_entropy(model(r).logits(x), targets_BxL),
          rest, x_BxLxD)
      head_grads, dx = head_vjp(jnp.ones((), loss.dtype))

      def backward(carry, layer):
        dx, acc_blocks, opt_state = carry
        x_l, frozen_l, params_l = _read_layer(
            (inputs, frozen_blocks, blocks), layer)
        _, vjp = jax.vjp(
            lambda p, x: block_apply(model_lib.combine(p, frozen_l), x),
            params_l, x_l)
        grads_l, dx = vjp(dx)
        grads_l = {**masked_rest, BLOCKS: grads_l}
        if first:
          opt_state = lw.refresh_layer(
              grads_l, opt_state, {**masked_rest, BLOCKS: params_l}, layer,
              **extra)
        reduced_l = lw.reduce_layer(grads_l, opt_state, layer)[BLOCKS]
        # The layer's slices, read first: a bfloat16 stack would otherwise be
        # converted to float32 whole by XLA's CPU compiler (`_read_layer`).
        acc_l = _read_layer(acc_blocks, layer)
        acc_blocks = _write_layer(acc_blocks, jax.tree.map(
            lambda acc, r: acc + r.astype(acc.dtype), acc_l, reduced_l), layer)
        return dx, acc_blocks, opt_state

      dx, acc_blocks, opt_state = _backward(backward,
                                            (dx, acc_blocks, opt_state))
      embed_grads, = embed_vjp(dx)
      acc_rest = jax.tree.map(lambda acc, h, e: acc + (h + e).astype(acc.dtype),
                              acc_rest, head_grads, embed_grads)
      return opt_state, acc_blocks, acc_rest, loss_sum + loss

    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                      tree)
    carry = (state.opt_state,
             zeros(accumulator_shapes(lw, rest, blocks, state.opt_state)),
             zeros(rest), jnp.zeros((), jnp.float32))
    if refresh is not False:  # the first micro-batch may refresh: traced apart
      carry = micro_batch(carry, parts[0], first=True)
      parts = parts[1:]
    carry, _ = jax.lax.scan(
        lambda c, part: (micro_batch(c, part, first=False), None), carry, parts)
    opt_state, acc_blocks, acc_rest, loss_sum = carry
    mean_rest = jax.tree.map(lambda a: a / k, acc_rest)

    def update(carry, layer):
      # The mean of each layer's accumulators is taken in its turn (a mean of
      # the whole stacks would be a second copy of them).
      opt_state, blocks, sq = carry
      params_l, reduced_l = _read_layer((blocks, acc_blocks), layer)
      reduced_l = jax.tree.map(lambda a: a / k, reduced_l)
      sq = sq + optax.tree.norm(reduced_l, squared=True)
      # The core reads reduced gradients in float32.
      reduced_l = jax.tree.map(
          lambda r, p: r if r.shape == p.shape else r.astype(jnp.float32),
          reduced_l, params_l)
      updates_l, opt_state = lw.update_layer(
          {**masked_rest, BLOCKS: reduced_l}, opt_state,
          {**masked_rest, BLOCKS: params_l}, layer, reduced=True)
      new_l = apply_updates({BLOCKS: params_l}, {BLOCKS: updates_l[BLOCKS]},
                            state.step, layer=layer)[BLOCKS]
      return opt_state, _write_layer(blocks, new_l, layer), sq

    num_layers = jax.tree.leaves(blocks)[0].shape[0]
    sq = optax.tree.norm(mean_rest, squared=True)
    (opt_state, blocks, sq), _ = jax.lax.scan(
        lambda c, layer: (update(c, layer), None), (opt_state, blocks, sq),
        jnp.arange(num_layers), reverse=True)
    masked_blocks = _masked_like(blocks)
    rest_updates, opt_state = lw.update_rest(
        {**mean_rest, BLOCKS: masked_blocks}, opt_state,
        {**rest, BLOCKS: masked_blocks})
    del rest_updates[BLOCKS]
    rest = apply_updates(rest, rest_updates, state.step)
    params = model_lib.combine(rest, {BLOCKS: blocks}, frozen,
                               {BLOCKS: frozen_blocks})
    metrics = {"train/loss": loss_sum / k,
               "train/reduced_grad_norm": jnp.sqrt(sq), "lr": lr(state.step)}
    return state_type(state.step + 1, params, opt_state), metrics

  return train_step


def accumulator_shapes(lw: subspax.LayerwiseUpdate, rest: dict, blocks: Any,
                       opt_state: Any) -> Any:
  """The stacked accumulators of the blocks: `(L, *B, r, D)` per projected
  kernel, the parameter's shape for the others; in the parameter's dtype, as
  `train.make_train_step` accumulates its gradients."""
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                       blocks)
  one = jax.eval_shape(lambda g, s: lw.reduce_layer(g, s, 0),
                       {**_masked_like(rest), BLOCKS: layer}, opt_state)[BLOCKS]
  return jax.tree.map(
      lambda x, p: jax.ShapeDtypeStruct((num_layers,) + x.shape, p.dtype),
      one, blocks)


def accumulator_bytes(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                      param_shapes: dict, opt_state: Any) -> dict[str, int]:
  """Exact bytes of `make_accumulating_step`'s accumulators (global).

  Args:
    graphdef: The scanned model's graph.
    tx: The optimizer.
    param_shapes: The parameters' `jax.ShapeDtypeStruct`s.
    opt_state: The optimizer state (or its shapes).

  Returns:
    `{"reduced": ..., "full": ...}`: the projected kernels' reduced-gradient
    accumulators, and the gradients of every other trainable leaf (norms,
    embedding, head), each in its parameter's dtype.
  """
  lw, _ = _layer_updates(graphdef, tx, param_shapes)
  trainable = model_lib.trainable(graphdef, param_shapes)
  blocks = trainable.pop(BLOCKS)
  accs = accumulator_shapes(lw, trainable, blocks, opt_state)
  pairs = list(zip(jax.tree.leaves(accs), jax.tree.leaves(blocks)))
  full = [acc for acc, p in pairs if acc.shape == p.shape]
  reduced = [acc for acc, p in pairs if acc.shape != p.shape]
  return {"reduced": subspax.state_bytes(reduced),
          "full": subspax.state_bytes([full, trainable])}

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
from flax import nnx

from train import errors
from train import model as model_lib

BLOCKS = "blocks"  # the stacked (L, ...) parameters of a scanned model


def validate(cfg: Any) -> None:
  """Rejects `opt.layerwise=True` where it cannot work.

  Raises:
    UserError: naming the fields that conflict and the fix.
  """
  if not cfg.opt.get("layerwise", False):
    return
  fix = "or set opt.layerwise=False"
  if not cfg.model.scan:
    raise errors.UserError(
        "opt.layerwise=True updates the stacked layers inside the backward "
        f"scan and needs model.scan=True; set model.scan=True {fix}")
  if cfg.opt.name == "optax_galore":
    raise errors.UserError(
        "opt.layerwise=True does not support opt.name='optax_galore' (it does "
        f"not project stacked layers); use opt.name='galore' {fix}")
  if cfg.opt.get("clip_norm", 0.0):
    raise errors.UserError(
        f"opt.clip_norm={cfg.opt.clip_norm} clips by the norm of the whole "
        "gradient, which a layer-wise step never holds (each layer is updated "
        f"before the next one's gradient exists); set opt.clip_norm=0 {fix}")
  if cfg.get("grad_accum", 1) != 1:
    raise errors.UserError(
        f"grad_accum={cfg.grad_accum} sums micro-batch gradients before one "
        "update, but a layer-wise step updates each layer as soon as its "
        "gradient exists (it would step once per micro-batch); set "
        f"grad_accum=1 and raise batch_size instead, {fix}")


def _read_layer(stacks: Any, layer: jax.Array) -> Any:
  """Layer `layer` of stacked arrays that a scan reads but does not write.

  Sliced inside a conditional on a predicate XLA cannot fold (`layer >= 0`).
  Otherwise XLA's CPU compiler, which slices bfloat16 arrays in float32,
  converts the whole stack to float32 once, outside the loop: a float32 copy
  of every stacked bfloat16 weight. Inside the conditional only the slice is
  converted, and the conversions fold away.
  """
  return jax.lax.cond(
      layer >= 0, lambda t: jax.tree.map(lambda a: a[layer], t),
      lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), t),
      stacks)


def _masked_like(tree: Any) -> Any:
  return jax.tree.map(lambda _: optax.MaskedNode(), tree)


def _sum_squares(tree: Any) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32)))
              for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


ApplyUpdates = Callable[..., Any]  # (params, updates, step, layer=None) -> params


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr: optax.Schedule, param_shapes: dict,
                    apply_updates: ApplyUpdates, state_type: type) -> Callable:
  """The layer-wise (state, batch) -> (state, metrics) step.

  Args:
    graphdef: The (scanned) model's graph.
    tx: The optimizer, acting on `model.trainable` parameters.
    lr: Its learning-rate schedule (for the metrics).
    param_shapes: The parameters' `jax.ShapeDtypeStruct`s.
    apply_updates: `(params, updates, step, layer=None) -> params` for a
      part of the trainable tree (`layer`: the blocks hold that layer only).
    state_type: The train state's type (`train.TrainState`).

  Returns:
    The step function; it equals `train.make_train_step`'s.
  """
  trainable_shapes = model_lib.trainable(graphdef, param_shapes)
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

    stacked = model_lib.combine(blocks, frozen_blocks)
    num_layers = jax.tree.leaves(blocks)[0].shape[0]

    def forward(x, layer):
      return block_apply(_read_layer(stacked, layer), x), x

    x_BxLxD, inputs = jax.lax.scan(forward, x_BxLxD, jnp.arange(num_layers))

    def head_loss(r, x):
      logits = model(r).logits(x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, targets_BxL).mean()

    loss, head_vjp = jax.vjp(head_loss, rest, x_BxLxD)
    head_grads, dx = head_vjp(jnp.ones((), loss.dtype))
    masked_rest = _masked_like(rest)

    def backward(carry, inputs_l):
      dx, blocks, opt_state, sq = carry
      layer = inputs_l
      x_l, frozen_l = _read_layer((inputs, frozen_blocks), layer)
      params_l = jax.tree.map(lambda a: a[layer], blocks)
      _, vjp = jax.vjp(
          lambda p, x: block_apply(model_lib.combine(p, frozen_l), x),
          params_l, x_l)
      grads_l, dx = vjp(dx)
      sq = sq + _sum_squares(grads_l)
      updates_l, opt_state = lw.update_layer(
          {**masked_rest, BLOCKS: grads_l}, opt_state,
          {**masked_rest, BLOCKS: params_l}, layer)
      new_l = apply_updates(params_l, updates_l[BLOCKS], state.step, layer)
      blocks = jax.tree.map(
          lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, layer, 0),
          blocks, new_l)
      return (dx, blocks, opt_state, sq), None

    (dx, blocks, opt_state, sq), _ = jax.lax.scan(
        backward, (dx, blocks, state.opt_state, jnp.zeros((), jnp.float32)),
        jnp.arange(num_layers), reverse=True)
    embed_grads, = embed_vjp(dx)
    rest_grads = jax.tree.map(jnp.add, head_grads, embed_grads)
    sq = sq + _sum_squares(rest_grads)
    masked_blocks = _masked_like(blocks)
    rest_updates, opt_state = lw.update_rest(
        {**rest_grads, BLOCKS: masked_blocks}, opt_state,
        {**rest, BLOCKS: masked_blocks})
    del rest_updates[BLOCKS]
    rest = apply_updates(rest, rest_updates, state.step)
    params = model_lib.combine(rest, {BLOCKS: blocks}, frozen,
                               {BLOCKS: frozen_blocks})
    metrics = {"train/loss": loss, "train/grad_norm": jnp.sqrt(sq),
               "lr": lr(state.step)}
    return state_type(state.step + 1, params, opt_state), metrics

  return train_step


def _block_graphdef(graphdef: nnx.GraphDef, param_shapes: dict) -> nnx.GraphDef:
  """The graph of one block of the scanned model (its parameters unstacked)."""
  return nnx.split(nnx.merge(graphdef, param_shapes).blocks)[0]

"""Layer-wise updates: a stacked model's optimizer step, one layer at a time.

A model whose layers are stacked along a leading axis (``(L, ...)``
parameters, run with ``lax.scan``) can apply each layer's update inside the
backward scan, as soon as that layer's gradient exists: the model-wide
gradient then never exists, only one layer's (the per-layer updates of the
GaLore paper, section 4.3). :func:`layerwise` turns any optax transformation
into the two calls such a backward pass makes:

* ``update_layer(grads, state, params, layer)`` for layer ``layer`` of every
  stacked parameter, writing that layer's optimizer state into ``state``;
* ``update_rest(grads, state, params)`` once per step, for the other
  parameters (embeddings, heads, final norms).

After ``update_layer`` for every layer (in any order) and one
``update_rest``, the parameters and the state equal one ``tx.update`` of the
whole tree: every state leaf that grows with the number of layers is read and
written at the layer's index; everything else (step counts, keys: the
*global* leaves) is read unchanged by every call and advanced once, by
``update_rest``. subspax's transformations take the layer's index
(``layer=``, an extra argument of ``update``) so that each layer's matrices
draw the keys they have in the stack, and they keep every projected
parameter's leaf index when part of the tree is masked.

The one thing :func:`layerwise` asks of a transformation's state (a protocol,
not a type): a per-parameter node whose class sets
``skips_masked_updates = True`` is passed whole to every call, also where the
call holds ``MaskedNode`` for its parameter, and the transformation returns it
unchanged there while still counting the parameter (subspax's
``ProjectedState``: a parameter's keys follow its place among the projected
ones). Every other state of a parameter outside the call is ``MaskedNode``.

What cannot be done layer by layer is anything that reads the whole
gradient before updating: clipping by the global norm
(``optax.clip_by_global_norm``), or accumulating gradients over micro-batches
(``optax.MultiSteps``). Such a transformation gives wrong results here; do not
chain it. Micro-batches are accumulated instead in the reduced space
(:mod:`subspax._reduced`): ``refresh_layer`` on the first micro-batch of a
refresh step, ``reduce_layer`` of every micro-batch's layer gradient (summed),
then ``update_layer(..., reduced=True)`` of the mean.

References:
  Zhao et al., GaLore, section 4.3 (per-layer weight updates),
  https://arxiv.org/abs/2403.03507;
  Lv et al., Full Parameter Fine-tuning for Large Language Models with
  Limited Resources (fused gradient computation and update),
  https://arxiv.org/abs/2306.09782
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from subspax import _reduced
from subspax import ordering

MaskedNode = optax.MaskedNode
Stacked = Union[Any, Callable[[Any], Any]]


class LayerwiseUpdate(NamedTuple):
  """The calls of a layer-wise step (see :func:`layerwise`).

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> params = {'blocks': jnp.ones((2, 4, 4)), 'head': jnp.ones((4, 3))}
    >>> lw = subspax.layerwise(optax.adam(1e-2), params, {'blocks': True,
    ...                                                   'head': False})
    >>> layers, rest = lw.split(params)
    >>> layers['head'], rest['blocks']
    (MaskedNode(), MaskedNode())

  Attributes:
    split: ``tree -> (stacked_part, rest_part)``: a tree of the parameters'
      structure as two trees of the same structure, each with
      ``optax.MaskedNode()`` in the other's places.
    update_layer: ``(grads, state, params, layer, **extra_args) -> (updates,
      state)``; ``extra_args`` go to ``tx.update`` (e.g. subspax's
      ``refresh=``).
      ``grads`` and ``params`` (or ``None``) are a stacked part holding layer
      ``layer`` of each stacked leaf (its leading axis removed); the updates
      come back the same way, and the returned state has that layer's state
      written in. Global leaves (counts) are not advanced.
    update_rest: ``(grads, state, params, **extra_args) -> (updates, state)`` for a rest
      part; advances the global leaves. Call it once per step, after the
      layers (or before: each call reads the global leaves of the previous
      step).
    reduce_layer: ``(grads, state, layer) -> reduced``: a layer's gradients
      (a stacked part, as for ``update_layer``) with each projected one
      replaced by its reduced gradient in the layer's current subspace
      (``subspax.reduce_gradients``); linear in ``grads``, so micro-batches
      add theirs. ``update_layer(reduced, ..., reduced=True)`` steps from
      (the mean of) them.
    refresh_layer: ``(grads, state, params, layer, **extra_args) -> state``:
      the layer's subspaces refreshed from ``grads``, no step
      (``subspax.refresh_subspaces``; pass ``refresh=``).
  """

  split: Callable[[Any], tuple[Any, Any]]
  update_layer: Callable[..., tuple[Any, Any]]
  update_rest: Callable[..., tuple[Any, Any]]
  reduce_layer: Callable[..., Any]
  refresh_layer: Callable[..., Any]


def layerwise(tx: optax.GradientTransformation, params: Any,
              stacked: Stacked) -> LayerwiseUpdate:
  """Splits ``tx``'s step into per-layer updates and one update of the rest.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> params = {'blocks': {'w': jnp.ones((3, 8, 16))}, 'head': jnp.ones((16, 4))}
    >>> grads = jax.tree.map(lambda p: 0.1 * p, params)
    >>> tx = subspax.galore(1e-2, rank=2)
    >>> lw = subspax.layerwise(tx, params, {'blocks': True, 'head': False})
    >>> state = tx.init(params)
    >>> layers, rest = lw.split(grads)
    >>> layer_params, rest_params = lw.split(params)
    >>> for i in range(3):
    ...   one = lambda tree: jax.tree.map(lambda x: x[i], tree)
    ...   _, state = lw.update_layer(one(layers), state, one(layer_params), i)
    >>> _, state = lw.update_rest(rest, state, rest_params)
    >>> _, whole = tx.update(grads, tx.init(params), params)
    >>> all(jax.tree.leaves(jax.tree.map(jnp.allclose, state, whole)))
    True

  Args:
    tx: Any optax transformation (subspax's or not) that does not read the
      whole gradient at once (no global-norm clipping, no ``MultiSteps``).
    params: The parameters, or their ``jax.ShapeDtypeStruct``s (only shapes
      and dtypes are read).
    stacked: Which parameters are stacked layers (leading axis ``L``, the
      same for all of them): a tree of bools with the structure of
      ``params`` (or a prefix of it), or a callable ``params -> tree``.

  Returns:
    A :class:`LayerwiseUpdate`.

  Raises:
    ValueError: No parameter is stacked, or the stacked ones disagree on
      ``L``.

  References:
    Zhao et al., GaLore, section 4.3, https://arxiv.org/abs/2403.03507
  """
  tx = optax.with_extra_args_support(tx)
  mask = _broadcast_mask(stacked(params) if callable(stacked) else stacked,
                         params)
  depths = {p.shape[0] if p.ndim else 0 for p, s in zip(
      jax.tree.leaves(params), jax.tree.leaves(mask)) if s}
  if len(depths) != 1 or 0 in depths:
    raise ValueError("stacked must mark parameters that share one leading "
                     f"layer axis; their leading sizes are {sorted(depths)}.")
  num_layers = depths.pop()

  def shapes(resize):
    return jax.tree.map(
        lambda p, s: resize(jax.ShapeDtypeStruct(p.shape, p.dtype), s),
        params, mask)

  def with_layers(n):
    return lambda p, s: (jax.ShapeDtypeStruct((n,) + p.shape[1:], p.dtype)
                         if s else p)

  whole = _leaves(jax.eval_shape(tx.init, shapes(with_layers(num_layers))))
  grown = _leaves(jax.eval_shape(tx.init, shapes(with_layers(num_layers + 1))))
  per_layer = {k for k, v in whole.items()
               if hasattr(v, "shape") and v.shape != grown[k].shape}
  layer_template = jax.eval_shape(tx.init, shapes(
      lambda p, s: with_layers(1)(p, s) if s else MaskedNode()))
  rest_template = jax.eval_shape(tx.init, shapes(
      lambda p, s: MaskedNode() if s else p))

  def split(tree):
    return (jax.tree.map(lambda x, s: x if s else MaskedNode(), tree, mask),
            jax.tree.map(lambda x, s: MaskedNode() if s else x, tree, mask))

  add_axis = lambda tree: None if tree is None else jax.tree.map(
      lambda x: x[None], tree)
  drop_axis = lambda tree: jax.tree.map(lambda x: x[0], tree)
  layer_shapes = shapes(lambda p, s: with_layers(1)(p, s) if s else MaskedNode())

  def update_layer(grads, state, params, layer, *, reduced=False,
                   **extra_args):
    sub = _gather(layer_template, state, per_layer, layer)
    grads = add_axis(grads)
    if reduced:
      grads, given = _reduced.reduced_arguments(grads, sub, layer_shapes)
      extra_args = dict(extra_args, reduced=given, refresh=False)
    updates, sub = tx.update(grads, sub, add_axis(params),
                             layer=layer, **extra_args)
    state = _scatter(state, sub, lambda key: key in per_layer,
                     lambda full, new: jax.lax.dynamic_update_slice_in_dim(
                         full, new.astype(full.dtype), layer, 0))
    return jax.tree.map(lambda u: u[0], updates), state

  def reduce_layer(grads, state, layer):
    sub = _gather(layer_template, state, per_layer, layer)
    return drop_axis(_reduced.reduce_gradients(add_axis(grads), sub))

  def refresh_layer(grads, state, params, layer, **extra_args):
    _, new = update_layer(grads, state, params, layer, refresh_only=True,
                          **extra_args)
    return _reduced.keep_subspaces(state, new)

  def update_rest(grads, state, params, **extra_args):
    sub = _gather(rest_template, state, per_layer, None)
    updates, sub = tx.update(grads, sub, params, **extra_args)
    state = _scatter(state, sub, lambda key: key not in per_layer,
                     lambda full, new: new)
    return updates, state

  return LayerwiseUpdate(split, update_layer, update_rest, reduce_layer,
                         refresh_layer)


def _broadcast_mask(mask: Any, params: Any) -> Any:
  """A bool per parameter from a tree of bools that is a prefix of it."""
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: bool(s), sub),
                      mask, params)


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _passed_whole(x) -> bool:
  """Whether a state node asks to be passed whole (the protocol above)."""
  return getattr(type(x), "skips_masked_updates", False) is True


def _is_node(x) -> bool:
  return isinstance(x, MaskedNode) or _passed_whole(x)


def _leaves(tree: Any, is_leaf=_is_masked) -> dict[str, Any]:
  """``tree``'s leaves by key path (``jax.tree_util.keystr``)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def _gather(template: Any, state: Any, per_layer: set[str], layer) -> Any:
  """The state one call updates, in the structure of ``template``.

  Per-layer leaves are sliced at ``layer`` (kept as an axis of 1), global
  ones are passed as they are, and those of parameters outside the call are
  ``MaskedNode``, except a node that sets ``skips_masked_updates``, which is
  passed whole (the transformation skips it and keeps its leaf index).
  """
  leaves, nodes = _leaves(state), _leaves(state, _is_node)
  flat, treedef = jax.tree_util.tree_flatten_with_path(template,
                                                       is_leaf=_is_masked)
  picked, sliced = [], []
  for path, leaf in flat:
    key = jax.tree_util.keystr(path)
    if _is_masked(leaf):
      node = nodes.get(key)
      picked.append(node if _passed_whole(node) else MaskedNode())
    elif not hasattr(leaves.get(key), "shape"):
      raise ValueError(
          f"The transformation's state at {key} differs when the parameters "
          "are split by layer (e.g. a stacked (L, D) parameter that is "
          "projected as an L x D matrix): route it explicitly "
          "(`projected=`) so that one layer is treated as the stack is.")
    elif key in per_layer and layer is not None:
      sliced.append(len(picked))
      picked.append(leaves[key])
    else:
      picked.append(leaves[key])
  if sliced:
    slices = _read_slices([picked[i] for i in sliced], layer)
    for i, value in zip(sliced, slices):
      picked[i] = value
  return treedef.unflatten(picked)


def _read_slices(stacks: list[jax.Array], layer: jax.Array) -> list[jax.Array]:
  """``[layer:layer + 1]`` of each stack, read before the layer's new state is
  written into the same stacks (`ordering.read_first`: otherwise XLA may fuse
  a slice into a computation that runs after the write, and copy the stack).
  """
  return ordering.read_first(
      stacks, layer,
      lambda xs: [jax.lax.dynamic_slice_in_dim(x, layer, 1, 0) for x in xs])


def _scatter(state: Any, sub: Any, writes: Callable[[str], bool],
             write: Callable[[jax.Array, jax.Array], jax.Array]) -> Any:
  """``state`` with the leaves of ``sub`` that ``writes`` selects written in."""
  new = _leaves(sub)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state,
                                                       is_leaf=_is_masked)
  out = []
  for path, leaf in flat:
    key = jax.tree_util.keystr(path)
    value = new.get(key)
    out.append(write(leaf, value) if value is not None and hasattr(
        value, "shape") and writes(key) else leaf)
  return treedef.unflatten(out)


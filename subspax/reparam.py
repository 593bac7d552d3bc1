"""Subspace-reparametrised linear layers: compute less, not only store less.

An optax transformation sees full ``m x n`` weight gradients, so it can shrink
Adam's moments but never the gradient buffer, the weight-gradient FLOPs, the
data-parallel all-reduce or the activations saved for the backward pass. These
functions move the subspace into the layer instead. A kernel ``W`` (``m x n``,
``y = x W``) is frozen between refreshes and gets a trainable reduced delta
``Delta`` of shape ``(r, D)`` in the canonical layout of docs/algorithms.md
section 1; the effective weight is ``W + back(Delta)``:

* side ``"left"`` (basis on the input dimension, ``d = m``):
  ``y = x W + coords(x) Delta``, so the weight gradient is
  ``dDelta = coords(x)^T dy`` (``2 N r n`` FLOPs instead of ``2 N m n``) and
  only ``coords(x)`` (``N x r``) is saved for it;
* side ``"right"`` (basis on the output dimension, ``d = n``):
  ``y = x W + embed(x Delta^T)``, ``dDelta = (x^T embed^T(dy))^T``.

``coords``/``embed`` are the basis applied to activations: ``x S`` / ``h S^T``
for a dense basis (RSO), a scaled column gather / scatter for a row selector
(GRASS). For a row selector the layer is a custom VJP that adds the delta's
rows into ``W`` before the one matmul, so only the weight gradient shrinks. At ``Delta = 0`` the gradient with respect to ``Delta`` is exactly
the reduced gradient ``project(G)`` the subspax transformations compute, so
Adam on ``Delta`` with its moments reset at every refresh is GRASS (reset
moments, ``alpha = 1``) or RSO. Every ``T`` steps a refresh, run outside
the train step:

1. :func:`merge_layers` folds every ``Delta`` into its ``W`` and zeroes it;
2. :func:`refresh_bases` picks each matrix's new basis with the policy, key
   and non-finite guard the transformations use (so the layers reproduce
   ``subspax.grass`` / ``subspax.rso``);
3. :func:`reset_moments` zeroes the deltas' Adam state
   (:func:`scale_by_delta_adam`) wherever it sits in the optimizer state.

Examples:
  >>> import jax.numpy as jnp, subspax
  >>> w = jnp.zeros((8, 16))
  >>> basis = subspax.DenseBasis(jnp.eye(8, 2))
  >>> delta = jnp.ones(subspax.reparam.delta_shape(8, 16, 2, 'auto'))
  >>> y = subspax.reparam.dense(jnp.ones((3, 8)), w, delta, basis, side='auto')
  >>> y.shape
  (3, 16)
  >>> w = subspax.reparam.merge(w, delta, basis, side='auto')  # every T steps

References:
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660 (section 3);
  Chen et al., RSO, https://arxiv.org/abs/2502.07222 (Algorithm 1)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from subspax import _bases
from subspax import _keys
from subspax import _layout
from subspax import _policies
from subspax import _validation

Basis = Union[_bases.DenseBasis, _bases.RowBasis]


class SubspaceLayer(NamedTuple):
  """One reparametrised kernel: ``W`` frozen, ``Delta`` trained, and the basis.

  Stacked layers (scanned blocks) carry the same leading axes on every field:
  a kernel ``(L, m, n)`` has a delta ``(L, r, D)`` and a basis whose arrays
  start with ``L`` (``DenseBasis.s``: ``(L, d, r)``; ``RowBasis.index`` and
  ``scale``: ``(L, r)``), one independent matrix per leading index.
  """

  kernel: jax.Array  # shape=(..., m, n), the parameter dtype
  delta: jax.Array  # shape=(..., r, D), D = n for side "left", m for "right"
  basis: Basis  # one basis per matrix, with the kernel's leading axes


def resolve_side(m: int, n: int, side: str = "auto") -> str:
  """The projected side of an ``m x n`` kernel (``"auto"``: the smaller one).

  Examples:
    >>> from subspax import reparam
    >>> reparam.resolve_side(64, 256), reparam.resolve_side(256, 64)
    ('left', 'right')

  Args:
    m: Rows of the kernel (its input dimension).
    n: Columns of the kernel (its output dimension).
    side: ``"auto"``, ``"left"`` or ``"right"``.

  Returns:
    ``"left"`` or ``"right"`` (ties go to ``"left"``, the input side).
  """
  _validation.choice("side", side, _layout.SIDES)
  if side == "auto":
    return "left" if m <= n else "right"
  return side


def delta_shape(m: int, n: int, rank: int, side: str) -> tuple[int, int]:
  """Shape ``(r, D)`` of the reduced delta of an ``m x n`` kernel.

  Examples:
    >>> import subspax
    >>> subspax.reparam.delta_shape(64, 256, rank=8, side='auto')
    (8, 256)

  Args:
    m: Rows of the kernel.
    n: Columns of the kernel.
    rank: The rank ``r``.
    side: ``"auto"``, ``"left"`` or ``"right"``.

  Returns:
    ``(rank, n)`` on side ``"left"``, ``(rank, m)`` on side ``"right"``.
  """
  return (rank, n) if resolve_side(m, n, side) == "left" else (rank, m)


def dense(x: jax.Array, kernel: jax.Array, delta: jax.Array, basis: Basis, *,
          side: str) -> jax.Array:
  """``x (sg(W) + back(Delta))``: a frozen kernel plus a trainable delta.

  The kernel is frozen (its gradient is zero); only ``delta`` and ``x`` get
  gradients. For a ``RowBasis`` (GRASS) the forward pass adds the ``r``
  scaled delta rows into ``W`` (no extra matmul) and the backward pass is a
  custom VJP: ``dx = dy (W + back(Delta))^T`` and ``dDelta`` from the ``r``
  selected input columns (side ``"left"``: ``coords(x)^T dy``, only ``N x r``
  saved) or output columns (``"right"``: ``coords(dy)^T x``), ``2 N r D``
  FLOPs in place of the ``2 N m n`` of a full weight gradient. For a
  ``DenseBasis`` (RSO) it is ``x W + (x S) Delta``, so only ``x S``
  (``N x r``) is saved for ``dDelta``.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> x, w = jnp.ones((4, 8)), jnp.zeros((8, 16))
    >>> basis = subspax.RowBasis(jnp.array([1, 5]), jnp.ones((2,)))
    >>> loss = lambda delta: subspax.reparam.dense(
    ...     x, w, delta, basis, side='left').sum()
    >>> jax.grad(loss)(jnp.zeros((2, 16))).shape  # only the r x D delta
    (2, 16)

  Args:
    x: Activations ``(..., m)``, in the compute dtype.
    kernel: ``W``, ``(m, n)``; cast to ``x.dtype``.
    delta: ``Delta``, ``(r, n)`` for side ``"left"``, ``(r, m)`` for
      ``"right"``; cast to ``x.dtype``.
    basis: One matrix's ``DenseBasis`` (``s``: ``(d, r)``) or ``RowBasis``.
    side: ``"left"``, ``"right"`` or ``"auto"`` (see :func:`resolve_side`).

  Returns:
    ``y``, ``(..., n)`` in ``x.dtype``.
  """
  m, n = kernel.shape
  side = resolve_side(m, n, side)
  kernel = jax.lax.stop_gradient(kernel).astype(x.dtype)
  delta = delta.astype(x.dtype)
  if isinstance(basis, _bases.RowBasis):
    return _row_linear(side, x, kernel, delta, basis.index, basis.scale)
  y = x @ kernel
  if side == "left":
    return y + basis.coords(x) @ delta
  return y + basis.embed(x @ delta.T, n)


def _with_rows(side: str, w: jax.Array, delta: jax.Array, index: jax.Array,
               scale: jax.Array) -> jax.Array:
  """``W + back(Delta)`` for a row selector: ``r`` scaled rows (or columns)."""
  rows = scale[:, None].astype(delta.dtype) * delta
  if side == "left":
    return w.at[index].add(rows)
  return w.at[:, index].add(rows.T)


def _contract(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T b`` over every leading axis: ``(..., p), (..., q) -> (p, q)``."""
  return jnp.einsum("...p,...q->pq", a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_linear(side, x, w, delta, index, scale):
  """GRASS's layer (Muhamed et al., section 3): ``x (W + back(Delta))`` whose
  backward pass computes only the ``r`` selected rows of the weight gradient.
  Every array is in the compute dtype; ``w`` gets a zero cotangent (frozen)."""
  return x @ _with_rows(side, w, delta, index, scale)


def _row_linear_fwd(side, x, w, delta, index, scale):
  y = x @ _with_rows(side, w, delta, index, scale)
  # What dDelta needs: the selected input columns (left) or all of x (right).
  saved = _bases.RowBasis(index, scale).coords(x) if side == "left" else x
  return y, (saved, w, delta, index, scale)


def _row_linear_bwd(side, residuals, dy):
  saved, w, delta, index, scale = residuals
  dx = dy @ _with_rows(side, w, delta, index, scale).T
  if side == "left":
    d_delta = _contract(saved, dy)
  else:
    d_delta = _contract(_bases.RowBasis(index, scale).coords(dy), saved)
  return (dx, jnp.zeros_like(w), d_delta.astype(delta.dtype), None,
          jnp.zeros_like(scale))


_row_linear.defvjp(_row_linear_fwd, _row_linear_bwd)


def merge(kernel: jax.Array, delta: jax.Array, basis: Basis, *,
          side: str) -> jax.Array:
  """Folds the delta into the kernel: ``W + back(Delta)``, in ``W``'s dtype.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> basis = subspax.RowBasis(jnp.array([1, 3]), jnp.ones((2,)))
    >>> merged = subspax.reparam.merge(jnp.zeros((4, 6)), jnp.ones((2, 6)),
    ...                                basis, side='left')
    >>> merged.sum(axis=1).tolist()  # rows 1 and 3 took the delta
    [0.0, 6.0, 0.0, 6.0]

  Args:
    kernel: ``W``, ``(..., m, n)``; leading axes are stacked matrices.
    delta: ``Delta``, ``(..., r, D)``.
    basis: The basis ``Delta`` was trained in (with the same leading axes).
    side: ``"left"``, ``"right"`` or ``"auto"`` (see :func:`resolve_side`).

  Returns:
    The merged kernel, ``(..., m, n)``.
  """
  m, n = kernel.shape[-2:]
  side = resolve_side(m, n, side)

  def merge_one(w, dl, b):
    dl = dl.astype(jnp.float32)
    full = b.back(dl, m) if side == "left" else b.back(dl, n).T
    return (w.astype(jnp.float32) + full).astype(w.dtype)

  return _per_matrix(merge_one, kernel.ndim - 2, kernel, delta, basis)


def _per_matrix(fn, batch_dims: int, *args):
  """``fn`` on every matrix of arrays (and bases) with ``batch_dims`` leading
  stacked axes, returning a tree with those axes back in front."""
  if not batch_dims:
    return fn(*args)
  lead = jax.tree.leaves(args)[0].shape[:batch_dims]
  flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[batch_dims:]), args)
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)


def _is_layer(x: Any) -> bool:
  return isinstance(x, SubspaceLayer)


def merge_layers(layers: Any, *, side: str = "auto") -> Any:
  """Folds every delta into its kernel and zeroes it (the start of a refresh).

  The effective weights ``W + back(Delta)`` are unchanged; afterwards the
  deltas are 0, ready to be trained in a new basis (:func:`refresh_bases`).

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> layer = subspax.reparam.SubspaceLayer(
    ...     kernel=jnp.zeros((4, 6)), delta=jnp.ones((2, 6)),
    ...     basis=subspax.RowBasis(jnp.array([0, 3]), jnp.ones((2,))))
    >>> merged = subspax.reparam.merge_layers({'q': layer})['q']
    >>> merged.kernel[:, 0].tolist(), float(merged.delta.sum())
    ([1.0, 0.0, 0.0, 1.0], 0.0)

  Args:
    layers: A pytree of :class:`SubspaceLayer` (stacked ones allowed).
    side: The layers' side option (see :func:`resolve_side`).

  Returns:
    The same tree; each kernel is ``merge(kernel, delta, basis)``, each delta
    zeros, each basis unchanged.

  References:
    Chen et al., RSO, https://arxiv.org/abs/2502.07222 (Algorithm 1, the
    merge after each subproblem)
  """
  def merge_layer(layer: SubspaceLayer) -> SubspaceLayer:
    return layer._replace(
        kernel=merge(layer.kernel, layer.delta, layer.basis, side=side),
        delta=jnp.zeros_like(layer.delta))
  return jax.tree.map(merge_layer, layers, is_leaf=_is_layer)


def refresh_bases(layers: Any, policy: _policies.SubspacePolicy,
                  update_interval: int, key: Union[jax.Array, int],
                  step: jax.Array, *, grads: Optional[Any] = None,
                  side: str = "auto",
                  layer: Optional[Union[int, jax.Array]] = None) -> Any:
  """New bases for every layer, as the subspax transformations would pick.

  Each stacked matrix gets the key the optimizer core uses for the same
  parameter at the same step (``subspax._keys``): the layer's leaf index is
  its position in ``jax.tree.flatten`` order of ``layers``, the rule the core
  applies to the projected parameters of its tree. Lay the layers out as the
  parameters are (a :class:`SubspaceLayer` at each kernel's path, nothing
  else) and the bases equal those of ``subspax.grass`` / ``subspax.rso`` with
  the same ``key`` on the plain model. As in the core, a matrix whose
  gradient is not finite keeps its old basis. The rank is the deltas' ``r``.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> layer = subspax.reparam.SubspaceLayer(
    ...     kernel=jnp.zeros((3, 6, 8)), delta=jnp.zeros((3, 2, 8)),
    ...     basis=subspax.DenseBasis(jnp.zeros((3, 6, 2))))
    >>> new = subspax.reparam.refresh_bases(
    ...     {'q': layer}, subspax.RandomSubspace(), update_interval=10, key=0,
    ...     step=jnp.array(20))
    >>> new['q'].basis.s.shape
    (3, 6, 2)

  Args:
    layers: A pytree of :class:`SubspaceLayer`, their deltas already merged
      (:func:`merge_layers`).
    policy: The subspace policy (``subspax.RowSubspace`` for GRASS,
      ``subspax.RandomSubspace`` for RSO).
    update_interval: The refresh interval ``T`` (the epoch is ``step // T``).
    key: The transformation's key (a ``jax.random.key`` or an int seed).
    step: The step the new bases are used from (``count`` in the core).
    grads: Full kernel gradients ``(..., m, n)``, one per layer, in a tree of
      ``layers``' structure; ``None`` for a policy that needs none
      (``policy.key_only``, RSO).
    side: The layers' side option (see :func:`resolve_side`).
    layer: ``None``, or the index of the one layer the stacked arrays hold
      (a ``[layer:layer + 1]`` slice of their leading axis): each matrix then
      gets its key in the whole stack (a layer-wise refresh, one layer at a
      time inside a backward pass).

  Returns:
    The same tree with new bases (kernels and deltas unchanged).

  Raises:
    TypeError: ``policy`` is not a ``SubspacePolicy``.
    ValueError: ``grads`` is ``None`` for a policy that needs a gradient.

  References:
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660;
    Chen et al., RSO, https://arxiv.org/abs/2502.07222
  """
  if not isinstance(policy, _policies.SubspacePolicy):
    raise TypeError(f"policy must be a subspax SubspacePolicy, got {policy!r}.")
  _validation.positive_int("update_interval", update_interval)
  if grads is None and not policy.key_only:
    raise ValueError(f"grads=None needs a policy that depends on the key alone; "
                     f"{type(policy).__name__} needs the kernels' gradients.")
  key = jax.random.wrap_key_data(_keys.key_data(key))
  flat, treedef = jax.tree.flatten(layers, is_leaf=_is_layer)
  flat_grads = ([None] * len(flat) if grads is None
                else treedef.flatten_up_to(grads))
  new = [
      one._replace(basis=_layer_bases(
          one, g, policy, update_interval, _keys.parameter_key(key, index),
          step, side, layer))
      for index, (one, g) in enumerate(zip(flat, flat_grads))]
  return treedef.unflatten(new)


def _layer_bases(layer: SubspaceLayer, grad: Optional[jax.Array], policy,
                 update_interval: int, key: jax.Array, step: jax.Array,
                 side_option: str, index: Optional[jax.Array] = None) -> Basis:
  """One (stacked) layer's new bases, one matrix at a time (``lax.map``);
  ``index``: the stack holds only that layer (see :func:`refresh_bases`)."""
  kernel = layer.kernel
  m, n = kernel.shape[-2:]
  side = resolve_side(m, n, side_option)
  d, r = (m if side == "left" else n), layer.delta.shape[-2]
  batch_dims = kernel.ndim - 2
  num = math.prod(kernel.shape[:batch_dims])
  epoch_keys = jax.vmap(lambda k: _keys.epoch_key(k, step, update_interval))(
      _keys.matrix_keys(key, num, 0 if index is None else index * num))
  flat = lambda a: a.reshape((num,) + a.shape[batch_dims:])
  old = jax.tree.map(flat, layer.basis)
  if grad is None:
    new = jax.lax.map(lambda k: policy.sample(k, d, r), epoch_keys)
  else:
    g = jax.vmap(lambda x: canonical(x, side))(flat(grad.astype(jnp.float32)))
    new = jax.lax.map(
        lambda args: policy.next_basis(args[2], args[0], args[1], r,
                                       first=step == 0,
                                       right=side == "right"),
        (g, epoch_keys, old))
  return jax.tree.map(lambda a, o: a.reshape(o.shape).astype(o.dtype), new,
                      layer.basis)


class DeltaAdamState(NamedTuple):
  """Adam's state of the deltas (the fields of ``optax.ScaleByAdamState``)."""

  count: jax.Array  # shape=(), int32: steps since the last reset
  mu: optax.Updates  # the deltas' first moments, their shapes
  nu: optax.Updates  # the deltas' second moments, their shapes


def scale_by_delta_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        *, prox: float = 0.0,
                        mu_dtype: Optional[jax.typing.DTypeLike] = None
                        ) -> optax.GradientTransformation:
  """Adam for the deltas, whose moments :func:`reset_moments` clears.

  ``optax.scale_by_adam`` with its state typed :class:`DeltaAdamState`, so a
  refresh finds and resets it wherever it sits in an optimizer's state (a
  ``chain``, a ``partition``, ``inject_hyperparams``) without knowing the
  nesting. Adam on ``Delta`` with moments reset at every refresh is GRASS /
  RSO with ``alpha = 1`` (the module docstring). ``prox`` adds RSO's proximal
  term ``prox * Delta`` to the gradient (``Delta`` is the displacement since
  the last merge); it needs ``params`` in ``update``.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = subspax.reparam.scale_by_delta_adam()
    >>> delta = {'q': jnp.zeros((2, 6))}
    >>> state = tx.init(delta)
    >>> _, state = tx.update({'q': jnp.ones((2, 6))}, state)
    >>> int(subspax.reparam.reset_moments(state).count)
    0

  Args:
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    prox: RSO's proximal coefficient ``1 / eta_k`` (0: off).
    mu_dtype: dtype of the first moments (default: the deltas' dtype).

  Returns:
    An ``optax.GradientTransformation``. Chain a learning rate after it.

  References:
    Chen et al., RSO, https://arxiv.org/abs/2502.07222 (the proximal term);
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
  """
  _validation.in_range("b1", b1, 0.0, 1.0)
  _validation.in_range("b2", b2, 0.0, 1.0)
  _validation.non_negative("eps", eps)
  _validation.non_negative("prox", prox)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

  def init_fn(params):
    return DeltaAdamState(*adam.init(params))

  def update_fn(updates, state, params=None):
    updates, state = adam.update(updates, optax.ScaleByAdamState(*state),
                                 params)
    return updates, DeltaAdamState(*state)

  tx = optax.GradientTransformation(init_fn, update_fn)
  if prox:
    tx = optax.chain(optax.add_decayed_weights(prox), tx)
  return tx


def reset_moments(opt_state: Any) -> Any:
  """``opt_state`` with every :class:`DeltaAdamState` back at its init.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = optax.chain(subspax.reparam.scale_by_delta_adam(),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> delta = {'q': jnp.zeros((2, 6))}
    >>> _, state = tx.update(delta, tx.init(delta))
    >>> state = subspax.reparam.reset_moments(state)  # found inside the chain
    >>> int(state[0].count)
    0

  Args:
    opt_state: Any optimizer state containing :func:`scale_by_delta_adam`'s.

  Returns:
    The same state; the deltas' counts and moments are zero (what
    ``init`` gives), everything else untouched.
  """
  def reset(x):
    if isinstance(x, DeltaAdamState):
      return jax.tree.map(jnp.zeros_like, x)
    return x
  return jax.tree.map(reset, opt_state,
                      is_leaf=lambda x: isinstance(x, DeltaAdamState))


def canonical(g: jax.Array, side: str) -> jax.Array:
  """A full ``(m, n)`` kernel gradient in the canonical ``(d, D)`` layout.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> subspax.reparam.canonical(jnp.zeros((256, 64)), 'auto').shape
    (64, 256)

  Args:
    g: The kernel's gradient, ``(m, n)``.
    side: ``"auto"``, ``"left"`` or ``"right"``.

  Returns:
    ``g`` on side ``"left"``, ``g.T`` on side ``"right"``.
  """
  m, n = g.shape
  return g if resolve_side(m, n, side) == "left" else g.T

"""The shared core: Adam whose moments live in a reduced subspace.

Every method in subspax is this one transformation with a different
:class:`~subspax.SubspacePolicy` (how the subspace is chosen and moved) and a
moment policy (what happens to the Adam moments when the subspace changes).
The step is docs/algorithms.md section 2 (moments: section 3; recovery: section 4):

1. every ``update_interval`` steps, refresh the basis and transform the moments
   (``keep``, ``reset``, ``rotate``; ``overlap`` for row selectors);
2. ``R = project(G)``; Adam moments on ``R``; ``N = mu_hat / (sqrt(nu_hat) + eps)``;
3. ``U = scale * back(N)``, plus Fira-style recovery scaling of the residual
   ``G - back(R)`` with a norm-growth limiter when ``recovery`` is on.

Parameters the policy does not project (1-D, embeddings, LM heads, masked out)
get plain :func:`optax.scale_by_adam` inside the same transformation, via
:func:`optax.partition`.

References:
  Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
  Robert et al., LDAdam (moment rotation), https://arxiv.org/abs/2410.16103;
  Chen et al., Fira (recovery scaling), https://arxiv.org/abs/2410.01623;
  Rajabi et al., SubTrack++, https://arxiv.org/abs/2502.01586
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from subspax import _blocks
from subspax import _keys
from subspax import _layout
from subspax import _policies
from subspax import _quantized
from subspax import _types
from subspax import _validation
from subspax import ordering

MOMENTS = typing.get_args(_types.Moments)
OUTPUTS = typing.get_args(_types.Output)
SCALE_TYPES = typing.get_args(_types.ScaleType)
LIMITERS = typing.get_args(_types.Limiter)
QUANTIZE_MOMENTS = typing.get_args(_types.QuantizeMoments)
MaskedNode = optax.MaskedNode

KeyLike = Union[int, jax.Array]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["basis", "mu", "nu", "age", "last_norm", "displacement"],
    meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class ProjectedState:
  """Optimizer state of one projected parameter (all its stacked matrices).

  Shapes use the canonical layout of :class:`~subspax.MatrixLayout`: ``*B`` is
  the parameter's batch shape, ``d`` the projected and ``D`` the kept side.

  Attributes:
    basis: The subspace, a ``DenseBasis`` (``s``: ``(*B, d, r)``, float32) or
      a ``RowBasis`` (``index``, ``scale``: ``(*B, r)``); ``MaskedNode`` when
      the basis is regenerated from the key (``store_basis=False``).
    mu: First moment, ``(*B, r, D)``, ``mu_dtype`` (float32 by default), or
      a signed ``QuantizedArray`` with ``quantize_moments`` on.
    nu: Second moment, ``(*B, r, D)``, ``nu_dtype`` (float32 by default), or
      an unsigned ``QuantizedArray`` (of ``sqrt(nu)``, rounded up).
    age: Steps accumulated in the moments since their last reset, int32:
      ``(*B,)`` for ``moments="reset"``, ``(*B, r)`` per row for
      ``"overlap"``; ``MaskedNode`` otherwise (the global count is used).
    last_norm: ``||Lambda||_F`` of the last recovery term, ``(*B,)`` float32;
      ``MaskedNode`` when recovery is off.
    displacement: RSO's proximal state ``B``, the reduced displacement of the
      parameter since the last refresh, ``(*B, r, D)`` float32 (zero after
      every refresh); ``MaskedNode`` when ``prox`` is None.
    layout: Static: how the parameter maps to canonical matrices.

  The core's loop over the stacked matrices works on one matrix at a time
  through the same record: the fields sliced to that matrix (no ``*B``), the
  layout unchanged.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> state = subspax.scale_by_galore(rank=2).init({'w': jnp.zeros((8, 16))})
    >>> leaf = state.inner_states['subspace'].inner_state.matrices['w']
    >>> leaf.basis.s.shape, leaf.mu.shape, leaf.layout.side
    ((8, 2), (2, 16), 'left')
  """

  basis: Any
  mu: jax.Array
  nu: jax.Array
  age: Any
  last_norm: Any
  displacement: Any
  layout: _layout.MatrixLayout

  def replace(self, **changes) -> ProjectedState:
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **changes)


class SubspaceAdamState(NamedTuple):
  """State of the projected part of :func:`scale_by_subspace_adam`.

  One step count and one key serve every projected parameter; each one's
  basis and moments are a :class:`ProjectedState` in ``matrices``.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> state = subspax.scale_by_grass(rank=2).init({'w': jnp.zeros((8, 16))})
    >>> inner = state.inner_states['subspace'].inner_state
    >>> int(inner.count), inner.key.shape, type(inner.matrices['w']).__name__
    (0, (2,), 'ProjectedState')

  Attributes:
    count: Steps taken, shape ``()``, int32.
    key: Raw PRNG key data, shape ``(2,)``, uint32 (checkpointable).
    matrices: A ``ProjectedState`` per projected leaf, ``MaskedNode`` for the
      others.
  """

  count: jax.Array
  key: jax.Array
  matrices: optax.Params


def _register_flax_serialization() -> None:
  """Lets ``flax.serialization`` (msgpack, state dicts) save ProjectedState.

  Only the array fields are saved; the static ``layout`` comes from the
  target state on restore, as for any pytree's structure. Skipped when flax
  is not installed (subspax does not depend on it).
  """
  try:
    from flax import serialization  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fields = [f.name for f in dataclasses.fields(ProjectedState)
            if f.name != "layout"]

  def to_state_dict(state):
    return {f: serialization.to_state_dict(getattr(state, f)) for f in fields}

  def from_state_dict(target, state_dict):
    return dataclasses.replace(target, **{
        f: serialization.from_state_dict(getattr(target, f), state_dict[f],
                                         name=f) for f in fields})

  serialization.register_serialization_state(ProjectedState, to_state_dict,
                                             from_state_dict)


_register_flax_serialization()


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static and numeric settings of one core transformation."""

  policy: _policies.SubspacePolicy
  rank: int
  update_interval: int
  b1: Any
  b2: Any
  eps: Any
  scale: Any
  moments: str
  recovery: bool
  recovery_limit: Any
  store_basis: bool
  mu_dtype: Any
  nu_dtype: Any
  output: str = "back"
  scale_type: str = "channel"
  limiter: str = "corrected"
  prox: Any = None
  prox_learning_rate: Any = 1.0
  quantize_moments: str = "off"
  basis_dtype: Any = jnp.float32

  @property
  def uses_prox(self) -> bool:
    """Whether RSO's proximal term (and its displacement state) is on.

    Decided by ``prox is not None``, never by its value: under
    ``optax.inject_hyperparams`` a number becomes a traced array, and the
    state must have the same fields with and without the wrapper.
    """
    return self.prox is not None

  @property
  def stores_basis(self) -> bool:
    return self.store_basis or not self.policy.key_only

  @property
  def tracks_norm(self) -> bool:
    """Whether a norm-growth limiter needs the last term's norm."""
    return self.limiter != "off" and (
        self.recovery or self.output == "scaled_gradient")


def _key_data(key: KeyLike) -> jax.Array:
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jax.random.key_data(jax.random.key(key))


def scale_by_subspace_adam(
    policy: _policies.SubspacePolicy,
    rank: int,
    update_interval: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    scale: float = 1.0,
    *,
    moments: Optional[_types.Moments] = None,
    recovery: bool = False,
    recovery_limit: float = 1.01,
    side: _types.Side = "auto",
    projected: _layout.Projected = None,
    store_basis: bool = True,
    key: KeyLike = 0,
    mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    output: _types.Output = "back",
    scale_type: _types.ScaleType = "channel",
    limiter: _types.Limiter = "corrected",
    prox: Optional[float] = None,
    prox_learning_rate: optax.ScalarOrSchedule = 1.0,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """Adam with moments in a reduced subspace chosen by ``policy``.

  The update of a projected parameter is written over its gradient, one
  matrix and one row block at a time. Jit the update with the gradients
  donated (``jax.jit(tx.update, donate_argnums=(0, 1))``, as a train step
  does) so that XLA writes into the gradient's buffer; a gradient that is
  not donated is copied first (docs/algorithms.md section 8.2).

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = subspax.scale_by_subspace_adam(
    ...     subspax.SvdSubspace(), rank=2, update_interval=10, scale=0.25)
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> updates['w'].shape
    (8, 16)

  Args:
    policy: How the subspace is chosen and moved (a ``SubspacePolicy``).
    rank: Subspace rank ``r`` (static).
    update_interval: Refresh the subspace every this many steps (``T``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    scale: Back-projection scale ``alpha`` (GaLore's ``scale``).
    moments: At a refresh, ``"keep"`` the moments, ``"reset"`` them to zero
      (with bias correction restarted), ``"rotate"`` them into the new basis
      (LDAdam), or keep the rows two row selections share (``"overlap"``).
      One of ``policy.moment_rules``; ``None``: the policy's default (the
      first of them: ``"keep"`` for ``SvdSubspace``, ``"rotate"`` for the
      geodesic and random policies, ``"reset"`` for ``RowSubspace``).
    recovery: Add Fira's scaled residual ``G - back(R)`` to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    side: ``"auto"`` projects the smaller matrix dimension; ``"left"`` or
      ``"right"`` force one (docs/algorithms.md section 1).
    projected: Which parameters to project. ``None``: every parameter with at
      least 2 dimensions whose smaller side exceeds ``rank`` and whose aspect
      ratio is at most 8. Otherwise a bool / :class:`MatrixSpec`, a pytree of
      them, or a callable ``(path, param) -> bool | MatrixSpec | None``; then
      the rank is ``min(rank, d)``.
    store_basis: Store the basis (default) or, for key-only policies,
      regenerate it from the key every step (0 bytes of basis state).
    key: PRNG key or int seed; per-matrix, per-refresh keys are derived with
      ``fold_in`` so they agree on every host and under any sharding.
    mu_dtype: dtype of the reduced first moments (and of Adam's ``mu`` for the
      other parameters); float32 by default.
    nu_dtype: dtype of the reduced second moments; float32 by default.
    output: ``"back"``: the update is ``scale * back(N)`` (plus recovery);
      ``"scaled_gradient"`` (APOLLO): the raw gradient scaled along its kept
      side, ``scale * G diag(s)``, ``s_j = ||N_j|| / (||R_j|| + 1e-8)``, with
      the norm-growth limiter on the whole update and no back-projection.
    scale_type: ``s`` (and the recovery scales ``phi``) per ``"channel"`` of
      the kept side, or one ``"tensor"``-wise ratio ``||N||_F / ||R||_F``.
    limiter: Norm-growth limiter of the recovery or scaled-gradient term:
      ``"corrected"`` bounds the growth of the bias-corrected term (the one
      applied); ``"uncorrected"`` bounds it before Adam's bias correction
      ``sqrt(1 - b2^t) / (1 - b1^t)`` as Fira's and APOLLO's code do;
      ``"off"`` disables it.
    prox: RSO's proximal coefficient ``1 / eta_k`` (docs/algorithms.md section 5.5): adds
      ``prox * B`` to the reduced gradient, ``B`` the reduced displacement of
      the parameter since the last refresh (an extra ``r x D`` state, reset at
      every refresh). ``None`` (default) turns it off and keeps no ``B``;
      any number, 0 included, keeps ``B`` (so that the state's fields do not
      depend on a value that ``optax.inject_hyperparams`` may trace).
    prox_learning_rate: The learning rate (float or schedule) chained after
      this transformation, used only to accumulate ``B``: the step moves the
      parameter by ``-prox_learning_rate(t) * scale * back(N)``. The method
      aliases (``subspax.rso``) pass their own ``learning_rate``.
    quantize_moments: Store the reduced moments block-wise in 8 bits
      (docs/algorithms.md section 8.1): ``"off"`` (``mu_dtype`` /
      ``nu_dtype``), ``"linear"`` or ``"quantile"`` levels (the latter dense
      near zero). One code per value and one float32 absmax per 256 values of
      a row; ``nu`` is stored as ``sqrt(nu)`` rounded up, so it never decodes
      below itself. The moments are computed in float32; ``mu_dtype`` then
      only sets the non-projected parameters' Adam ``mu``, which is never
      quantized.
    basis_dtype: dtype the floating-point part of a stored basis is kept in
      (float32 by default; bfloat16 halves a dense basis, as GaLore's 8-bit
      runs keep the projector in the gradients' dtype). It is read into
      float32 for the projections and for the next refresh.

  Returns:
    An ``optax.GradientTransformation``. Chain a learning rate after it.

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
    Rajabi et al., SubTrack++, https://arxiv.org/abs/2502.01586
  """
  if not isinstance(policy, _policies.SubspacePolicy):
    raise TypeError(f"policy must be a subspax SubspacePolicy, got {policy!r}.")
  _validation.positive_int("rank", rank)
  _validation.positive_int("update_interval", update_interval)
  _validation.in_range("b1", b1, 0.0, 1.0)
  _validation.in_range("b2", b2, 0.0, 1.0)
  _validation.non_negative("eps", eps)
  if moments is None:
    moments = policy.moment_rules[0]
  _validation.choice("moments", moments, MOMENTS)
  _validation.choice("side", side, _layout.SIDES)
  _validation.in_range("recovery_limit", recovery_limit, 1.0, float("inf"))
  _validation.choice("output", output, OUTPUTS)
  _validation.choice("scale_type", scale_type, SCALE_TYPES)
  _validation.choice("limiter", limiter, LIMITERS)
  _validation.choice("quantize_moments", quantize_moments, QUANTIZE_MOMENTS)
  if output == "scaled_gradient" and recovery:
    raise ValueError('output="scaled_gradient" already scales the whole '
                     'gradient; set recovery=False.')
  if limiter == "uncorrected" and moments == "overlap":
    raise ValueError('limiter="uncorrected" needs one step count per matrix; '
                     'moments="overlap" counts per row. Use "corrected".')
  if moments not in policy.moment_rules:
    raise ValueError(
        f'moments="{moments}" does not suit {type(policy).__name__} (it '
        f'supports {", ".join(policy.moment_rules)}); "overlap" needs a '
        'row-selection policy (subspax.grass).')
  if recovery and not policy.orthonormal:
    raise ValueError("recovery=True needs an orthonormal basis; the Gaussian "
                     "basis (orthonormal=False) has none. Turn one of them off.")
  if not store_basis and not policy.key_only:
    raise ValueError(
        f"store_basis=False needs a basis that depends on the key alone "
        f"(grassjump, rso); {type(policy).__name__} depends on the gradient.")
  if prox is not None:
    _validation.non_negative("prox", prox)
    if recovery or output != "back":
      raise ValueError("prox tracks the reduced displacement only; it needs "
                       'recovery=False and output="back" (or prox=None).')

  config = _Config(
      policy=policy, rank=rank, update_interval=update_interval, b1=b1, b2=b2,
      eps=eps, scale=scale, moments=moments, recovery=recovery,
      recovery_limit=recovery_limit, store_basis=store_basis,
      mu_dtype=jnp.float32 if mu_dtype is None else mu_dtype,
      nu_dtype=jnp.float32 if nu_dtype is None else nu_dtype,
      output=output, scale_type=scale_type, limiter=limiter, prox=prox,
      prox_learning_rate=prox_learning_rate,
      quantize_moments=quantize_moments,
      basis_dtype=jnp.float32 if basis_dtype is None else basis_dtype)
  route = _layout.make_router(projected, rank)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: "subspace" if route(path, p) is not None else "adam",
        params)

  return optax.partition(
      {
          "subspace": _scale_by_projected_adam(config, route, side, key),
          "adam": optax.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                      mu_dtype=mu_dtype),
      },
      labels)


def _scale_by_projected_adam(config: _Config, route, side: str,
                             key: KeyLike) -> optax.GradientTransformation:
  """The projected half of :func:`scale_by_subspace_adam` (all leaves routed)."""

  def init_fn(params):
    matrices = jax.tree_util.tree_map_with_path(
        lambda path, p: _init_matrices(config, _layout.make_layout(
            p.shape, route(path, p), config.rank, side)), params)
    return SubspaceAdamState(
        count=jnp.zeros([], jnp.int32), key=_key_data(key), matrices=matrices)

  def update_fn(updates, state, params=None, *, layer=None, refresh=None,
                refresh_only=False, reduced=None, **extra_args):
    """One step; ``layer``: the stacked leaves hold only that layer.

    ``refresh``: ``None`` decides inside the program whether this step
    refreshes the subspaces (``count % update_interval == 0``), with a
    conditional per matrix; ``True`` or ``False`` (the caller knows the step
    count) makes the choice when tracing, so an ordinary step compiles with
    no conditional (each is a host synchronisation on a GPU) and a refresh
    step is a program of its own. The results are the same.

    A parameter whose update is ``MaskedNode`` while its state is a
    ``ProjectedState`` is skipped (its state is returned unchanged): this is
    how :func:`subspax.layerwise` updates a part of the tree while every
    projected parameter keeps its leaf index (its key).

    The two hooks of a step accumulated in the reduced space
    (:func:`subspax.refresh_subspaces`, ``LayerwiseUpdate.reduce_layer``):
    ``refresh_only=True`` refreshes the subspaces from ``updates`` (as
    ``refresh`` decides) and applies the moment policy, but takes no Adam
    step, leaves ``updates`` and the count unchanged; ``reduced``, a tree
    like ``updates`` with each projected parameter's reduced gradient
    (``(*B, r, D)``, float32; None elsewhere), replaces the projection of
    ``updates``, whose projected leaves then only hold the buffers the
    updates are written into (never refreshes: a refresh needs the full
    gradient).
    """
    del params, extra_args
    if reduced is not None:
      if refresh:
        raise ValueError("reduced= gives no full gradient to refresh from; "
                         "refresh first (refresh_only=True), then pass "
                         "refresh=False.")
      if config.recovery or config.output != "back":
        raise ValueError(
            "reduced= needs recovery=False and output=\"back\": the recovery "
            "term and the scaled gradient read the full gradient.")
      refresh = False
      reduced_leaves = jax.tree.leaves(
          reduced, is_leaf=lambda x: x is None or _is_masked(x))
    else:
      reduced_leaves = None
    base_key = jax.random.wrap_key_data(state.key)
    flat, treedef = jax.tree.flatten(updates, is_leaf=_is_masked)
    leaf_states = jax.tree.leaves(state.matrices, is_leaf=_is_leaf_state)
    if len(flat) != len(leaf_states):
      raise ValueError("The updates do not have the structure of the state's "
                       "parameters.")
    if reduced_leaves is not None and len(reduced_leaves) != len(flat):
      raise ValueError("reduced= does not have the structure of the updates.")
    new_updates, new_states, count, index = [], [], state.count, 0
    for i, (g, leaf_state) in enumerate(zip(flat, leaf_states)):
      if isinstance(leaf_state, ProjectedState):
        if not _is_masked(g):
          reduced_g = None if reduced_leaves is None else reduced_leaves[i]
          if reduced_leaves is not None and not hasattr(reduced_g, "shape"):
            raise ValueError(f"reduced= has no reduced gradient for projected "
                             f"parameter {i}.")
          update_parameter = _sharding_agnostic(functools.partial(
              _update_parameter, config, layer=layer, refresh=refresh,
              refresh_only=refresh_only, reduced=reduced_g))
          g, leaf_state = update_parameter(
              g, leaf_state, count, _keys.parameter_key(base_key, index))
          # Parameters are updated one after the other: each reads its count
          # after the previous one's new state exists. Otherwise XLA may start
          # every projection first, or write every new moment last, and keep
          # all their workspace alive at once. (The chain reads the new
          # state, not the update, so a chained scale applies in place.)
          count = ordering.run_after(state.count, leaf_state, state.count)
        index += 1
      new_updates.append(g)
      new_states.append(leaf_state)
    new_matrices = jax.tree.structure(
        state.matrices, is_leaf=_is_leaf_state).unflatten(new_states)
    return treedef.unflatten(new_updates), SubspaceAdamState(
        count=(state.count if refresh_only
               else optax.safe_int32_increment(state.count)),
        key=state.key, matrices=new_matrices)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _is_leaf_state(x) -> bool:
  return isinstance(x, (ProjectedState, MaskedNode))


def _sharding_agnostic(update_parameter):
  """Runs ``update_parameter`` with Auto axes under an Explicit mesh.

  With sharding in types, contractions over a sharded dimension (``S^T G``
  when ``G``'s kept side is sharded, say) need an explicit output sharding.
  The reduced-space math is written once, for Auto axes; under an Explicit
  mesh it runs inside ``jax.sharding.auto_axes`` and its outputs keep the
  shardings of the gradient and of the incoming state.
  """

  def run(g, leaf_state, count, key):
    if not jax.sharding.get_abstract_mesh().explicit_axes:
      return update_parameter(g, leaf_state, count, key)
    out_sharding = jax.tree.map(lambda x: jax.typeof(x).sharding,
                                (g, leaf_state))
    return jax.sharding.auto_axes(update_parameter, out_sharding=out_sharding)(
        g, leaf_state, count, key)

  return run


def _stored_dtype(dtype, basis_dtype):
  """The dtype a basis array of ``dtype`` is stored in: ``basis_dtype`` for
  floating-point parts (bases, scales), integer indices as they are."""
  return basis_dtype if jnp.issubdtype(dtype, jnp.floating) else dtype


def _init_matrices(config: _Config, layout: _layout.MatrixLayout
                   ) -> ProjectedState:
  """Zero state of one projected parameter."""
  r, d, big_d = layout.rank, layout.d, layout.D

  def batched_zeros(trailing, dtype):
    return jnp.zeros(layout.batched(*trailing), dtype)

  def moment_zeros(dtype, signed):
    if config.quantize_moments == "off":
      return batched_zeros((r, big_d), dtype)
    return _quantized.zeros(layout.batched(r, big_d), config.quantize_moments,
                            signed)

  basis = MaskedNode()
  if config.stores_basis:
    basis = jax.tree.map(lambda a: batched_zeros(a.shape, _stored_dtype(
        a.dtype, config.basis_dtype)), config.policy.zeros(d, r))
  age = MaskedNode()
  if config.moments == "reset":
    age = batched_zeros((), jnp.int32)
  elif config.moments == "overlap":
    age = batched_zeros((r,), jnp.int32)
  return ProjectedState(
      basis=basis,
      mu=moment_zeros(config.mu_dtype, signed=True),
      nu=moment_zeros(config.nu_dtype, signed=False),
      age=age,
      last_norm=(batched_zeros((), jnp.float32) if config.tracks_norm
                 else MaskedNode()),
      displacement=(batched_zeros((r, big_d), jnp.float32)
                    if config.uses_prox else MaskedNode()),
      layout=layout)


def _update_parameter(config: _Config, g: jax.Array, state: ProjectedState,
                      count: jax.Array, key: jax.Array, *,
                      layer: Optional[jax.Array] = None,
                      refresh: Optional[bool] = None,
                      refresh_only: bool = False,
                      reduced: Optional[jax.Array] = None):
  """Updates every matrix of one projected parameter.

  Memory: nothing full-size is added beyond the output. The matrices are
  updated one at a time in a loop whose carry is the gradient itself
  (overwritten with the update, so XLA can write it into a donated buffer),
  and each matrix is read and written in row blocks (:mod:`subspax._blocks`).
  A refresh step refreshes each matrix in the same loop, just before its
  update (a ``lax.cond`` per matrix): its workspace is one matrix's too, the
  gradient is read only through the loop (a cond that took the whole gradient
  as an operand makes XLA copy it before the in-place loop), and CPU LAPACK
  calls are not batched (batched ones can deadlock jaxlib 0.10's CPU runtime
  with many devices).

  ``layer``: ``g`` and ``state`` are the slice ``[layer:layer + 1]`` of a
  stacked parameter (the keys are those of its matrices in the stack).
  ``refresh``: whether this step refreshes, if known when tracing (else
  decided from ``count`` by a conditional per matrix). ``refresh_only``:
  refresh, take no step, return ``g`` unchanged. ``reduced``: the reduced
  gradients ``(*B, r, D)`` used instead of projecting ``g`` (see
  ``update_fn``).
  """
  layout = state.layout
  nb = len(layout.batch_shape)
  num = layout.num_matrices
  right = layout.side == "right"
  flat_fields = jax.tree.map(lambda a: a.reshape((num,) + a.shape[nb:]),
                             state)
  # One layer of a stack (`layer` given): its matrices' keys in the stack.
  keys = _keys.matrix_keys(key, num, 0 if layer is None else layer * num)
  stack = layout.to_matrices(g, dtype=g.dtype)  # (num, m, n), a view
  if reduced is not None:
    reduced = reduced.reshape((num,) + reduced.shape[nb:])

  refreshing = count % config.update_interval == 0

  def update_one(i, carry):
    stack, fields = carry
    fields_i = _materialized(jax.tree.map(lambda a: a[i], fields), count,
                             num, always=config.quantize_moments != "off")
    # A basis stored in a narrower dtype is used in float32 (written back
    # in its own dtype by `_write_index`).
    fields_i = fields_i.replace(basis=jax.tree.map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(
            a.dtype, jnp.floating) else a, fields_i.basis))

    def refresh_matrix(fields_i):
      # Made canonical (transposed for side "right") one matrix at a time:
      # the buffers of both branches of a cond are allocated on every step.
      canonical = stack[i].astype(jnp.float32)
      canonical = canonical.T if right else canonical
      return _refresh_matrix(config, canonical, fields_i, keys[i],
                             count=count, right=right)

    if refresh is None:
      fields_i = jax.lax.cond(refreshing, refresh_matrix, lambda f: f, fields_i)
    elif refresh:
      fields_i = refresh_matrix(fields_i)
    if refresh_only:
      return stack, _write_index(fields, fields_i, i)
    if config.stores_basis:
      basis = fields_i.basis
    else:
      basis = config.policy.sample(_epoch_key(config, keys[i], count),
                                   layout.d, layout.rank)
    matrix = _blocks.StackedMatrix(
        stack, i, basis, layout.rank, right, zero=ordering.allocate_late(count),
        reduced=None if reduced is None else reduced[i])
    stack, new_state = _update_matrix(config, matrix, fields_i, count=count)
    return stack, _write_index(fields, new_state, i)

  stack, new_fields = jax.lax.fori_loop(0, num, update_one,
                                        (stack, flat_fields))
  new_state = jax.tree.map(lambda a, old: a.reshape(old.shape), new_fields,
                           state)
  return layout.from_matrices(stack, g.dtype), new_state


def _write_index(stacked, values, i):
  """Writes ``values`` (a per-matrix tree) at index ``i`` of ``stacked``."""
  return jax.tree.map(
      lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i,
                                                       0), stacked, values)


def _materialized(tree, count: jax.Array, num: int, always: bool = False):
  """``tree`` (a matrix's state, sliced out of the stacked state), read first.

  The matrix loop writes each matrix's new state back into the stacked state
  in place; unless its old slices are read first (`ordering.read_first`), XLA
  fuses some reads into computations that run after the write and copies
  every whole stack. A single matrix (``num == 1``, the loop is removed) needs
  no such thing, unless ``always``: 8-bit moments are decoded by table
  lookups that XLA would otherwise hoist, for every parameter, to the start
  of the update (the read is ordered after ``count``, which comes after the
  previous parameter).
  """
  if num == 1 and not always:
    return tree
  return ordering.read_first(tree, count)


def _update_matrix(config: _Config, matrix: _blocks.StackedMatrix,
                   state: ProjectedState, *, count: jax.Array):
  """One reduced-space Adam step on one matrix, written over its gradient.

  Returns:
    ``(stack, state)``: the stack with this matrix's gradient replaced by its
    update, and the matrix's new state (``basis`` untouched).
  """
  reduced = matrix.project()
  normalized, steps, state = _adam_step(config, reduced, state, count=count)
  if config.output == "scaled_gradient":
    kept, last_norm = _scaled_gradient(config, matrix, reduced, normalized,
                                       state.last_norm, steps)
    return matrix.write_update(None, kept), state.replace(last_norm=last_norm)
  direction = config.scale * normalized
  if not config.recovery:
    return matrix.write_update(direction), state
  phi, last_norm = _recovery_scales(config, matrix, reduced, normalized,
                                    state.last_norm, steps)
  stack = matrix.write_update(direction, phi, residual_of=reduced)
  return stack, state.replace(last_norm=last_norm)


def _epoch_key(config: _Config, key: jax.Array, count: jax.Array,
               offset: int = 0) -> jax.Array:
  """The key of the subspace in use at step ``count`` (``offset`` epochs on)."""
  return _keys.epoch_key(key, count, config.update_interval, offset)


def _refresh_matrix(config: _Config, g: jax.Array, state: ProjectedState,
                    key: jax.Array, *, count: jax.Array,
                    right: bool = False) -> ProjectedState:
  """New basis for one canonical matrix, and the moment policy applied.

  ``right`` tells that ``g`` is the transpose of the matrix as stored (for
  policies whose result depends on it, see ``refresh_oriented``). RSO's
  displacement restarts from zero.
  """
  policy = config.policy
  r, d = state.mu.shape[0], g.shape[0]
  epoch_key = _epoch_key(config, key, count)
  if config.stores_basis:
    old = state.basis
    new = policy.next_basis(old, g, epoch_key, r, first=count == 0,
                            right=right)
    stored = new
  else:
    old = policy.sample(_epoch_key(config, key, count, offset=-1), d, r)
    new = policy.sample(epoch_key, d, r)
    stored = state.basis
  mu, nu, age = _transition(config.moments, old, new, state.mu, state.nu,
                            state.age)
  displacement = jax.tree.map(jnp.zeros_like, state.displacement)
  return state.replace(basis=stored, mu=mu, nu=nu, age=age,
                       displacement=displacement)


def _adam_step(config: _Config, reduced: jax.Array, state: ProjectedState, *,
               count: jax.Array):
  """Adam on one matrix's reduced gradient ``R`` (canonical ``(r, D)``).

  With RSO's proximal term, Adam sees ``R + prox * B`` and the displacement
  ``B`` moves by ``-lr(t) * scale * N`` (the parameter's own move).

  Returns:
    ``(N, steps, state)``: the normalized direction
    ``mu_hat / (sqrt(nu_hat) + eps)``, Adam's step count of the moments
    (per row for ``moments="overlap"``), and the state with the new moments.
  """
  if config.uses_prox:
    reduced = reduced + config.prox * state.displacement
  mu = config.b1 * _quantized.load(state.mu) + (1 - config.b1) * reduced
  nu = config.b2 * _quantized.load(state.nu) + (1 - config.b2) * jnp.square(
      reduced)
  age = state.age
  if isinstance(age, MaskedNode):
    steps = optax.safe_int32_increment(count)
  else:
    age = optax.safe_int32_increment(age)
    steps = age[:, None] if age.ndim else age
  mu_hat = mu / _bias_correction(config.b1, steps)
  nu_hat = nu / _bias_correction(config.b2, steps)
  normalized = mu_hat / (jnp.sqrt(nu_hat) + config.eps)
  moments = (_quantized.store(mu, state.mu, cast=False),
             _quantized.store(nu, state.nu, cast=False))
  if config.quantize_moments != "off":
    # Quantized whole, here: the parameter chain (``ordering.run_after``) reads one code,
    # which XLA could otherwise compute alone and leave the rest, with this
    # matrix's float32 moments, to the end of the update.
    moments = _materialized(moments, count, 1, always=True)
  state = state.replace(mu=moments[0], nu=moments[1], age=age)
  if config.uses_prox:
    lr = config.prox_learning_rate
    lr = lr(count) if callable(lr) else lr
    state = state.replace(displacement=state.displacement
                           - lr * config.scale * normalized)
  return normalized, steps, state


def _bias_correction(decay, steps: jax.Array) -> jax.Array:
  """Adam's ``1 - decay**steps``, float32 whatever the dtype of ``decay``.

  Under ``jax_enable_x64`` a Python float raised to an int32 power is
  float64, which would make every quantity downstream float64: the reduced
  direction, the recovery scales, and the float32 accumulators of the
  row-block loops (:mod:`subspax._blocks`), whose carry must keep its type.
  """
  return (1 - decay**steps).astype(jnp.float32)


def _transition(moments: str, old, new, mu, nu, age):
  """Applies the moment policy at a basis change ``old -> new``."""
  if moments == "keep":
    return mu, nu, age
  if moments == "reset":
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return zeros(mu), zeros(nu), zeros(age)
  if moments == "overlap":
    return _carry_rows(old, new, mu, nu, age)
  c = new.gram(old)  # (r, r): reduced coordinates old -> new
  mu32, nu32 = _quantized.load(mu), _quantized.load(nu)
  new_mu = c @ mu32
  new_nu = jnp.abs(jnp.square(c) @ (nu32 - jnp.square(mu32))
                   + jnp.square(new_mu))
  return _quantized.store(new_mu, mu), _quantized.store(new_nu, nu), age


def _carry_rows(old, new, mu, nu, age):
  """``moments="overlap"``: each new slot takes one old slot of its row.

  A kept row changes scale from ``rho_old`` to ``rho_new``, so its ``mu`` is
  multiplied by ``rho_new / rho_old`` and its ``nu`` by the square. It is a
  gather (never a sum of slots, never ``0 * NaN`` from other rows); slots
  with no old row, or whose carried moments are not finite, start at zero.
  """
  source, ratio, found = new.overlap(old)
  new_mu = _quantized.load(mu)[source] * ratio[:, None]
  new_nu = _quantized.load(nu)[source] * jnp.square(ratio)[:, None]
  keep = found & jnp.all(jnp.isfinite(new_mu) & jnp.isfinite(new_nu), axis=1)
  new_mu = jnp.where(keep[:, None], new_mu, 0.0)
  new_nu = jnp.where(keep[:, None], new_nu, 0.0)
  new_age = jnp.where(keep, age[source], 0)
  return (_quantized.store(new_mu, mu), _quantized.store(new_nu, nu),
          new_age)


def _recovery_scales(config: _Config, matrix, reduced, normalized,
                     last_norm, steps):
  """Fira recovery scaling with the norm-growth limiter.

  ``Lambda = (G - back(R)) diag(phi)``, ``phi_j = ||N_j|| / (||R_j|| + 1e-8)``,
  limited so that ``||Lambda||`` grows by at most ``recovery_limit`` per step.
  ``||Lambda||_F`` is computed from the residual itself, one row block at a
  time (no full-size buffer, no cancellation).

  Returns:
    ``(f phi, ||f Lambda||)``: the limited scales and the new ``last_norm``.
  """
  phi = _kept_scales(config, reduced, normalized)
  norm = jnp.sqrt(matrix.residual_sq_norm(reduced, phi))
  factor, last_norm = _limit_growth(config, norm, last_norm, steps)
  return factor * phi, last_norm


def _kept_scales(config: _Config, reduced, normalized) -> jax.Array:
  """``s_j = ||N_j|| / (||R_j|| + 1e-8)`` per kept column, ``(D,)``.

  ``scale_type="tensor"`` uses one ratio of Frobenius norms for every column.
  """
  if config.scale_type == "tensor":
    ratio = jnp.linalg.norm(normalized) / (jnp.linalg.norm(reduced) + 1e-8)
    return jnp.full(reduced.shape[-1:], ratio)
  return jnp.linalg.norm(normalized, axis=0) / (
      jnp.linalg.norm(reduced, axis=0) + 1e-8)


def _limit_growth(config: _Config, norm, last_norm, steps):
  """The norm-growth limiter: ``norm`` may grow ``recovery_limit``x per step.

  Args:
    config: ``limiter`` selects the convention (see
      :func:`scale_by_subspace_adam`).
    norm: Frobenius norm of this step's (bias-corrected) term.
    last_norm: The value this returned at the previous step (0 at first).
    steps: Adam's step count ``t`` of the moments (for ``"uncorrected"``).

  Returns:
    ``(factor, new_last_norm)``: multiply the term by ``factor``.
  """
  if config.limiter == "off":
    return jnp.ones_like(norm), last_norm
  if config.limiter == "uncorrected":
    # The authors limit mu / (sqrt(nu) + eps) before Adam's bias correction.
    norm = norm * _bias_correction(config.b1, steps) / jnp.sqrt(
        _bias_correction(config.b2, steps))
  limit = config.recovery_limit * last_norm
  too_big = (last_norm > 0) & (norm > limit)
  factor = jnp.where(too_big, limit / jnp.where(norm > 0, norm, 1.0), 1.0)
  return factor, norm * factor


def _scaled_gradient(config: _Config, matrix, reduced, normalized, last_norm,
                     steps):
  """APOLLO's update ``scale * f * G diag(s)`` of one matrix.

  ``s`` (:func:`_kept_scales`) scales the kept side of ``G``; ``f`` is the
  norm-growth limiter's factor for ``||G diag(s)||_F``, computed from the
  kept side's norms, so no ``m x n`` buffer besides the output.

  Returns:
    ``(scale * f * s, new_last_norm)``.
  """
  s = _kept_scales(config, reduced, normalized)
  norm = jnp.sqrt(jnp.sum(jnp.square(s) * matrix.kept_sq_norms()))
  factor, last_norm = _limit_growth(config, norm, last_norm, steps)
  return config.scale * factor * s, last_norm

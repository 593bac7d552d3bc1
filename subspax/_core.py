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

This module checks the options and assembles the transformation: routing,
initial state, and the order in which parameters are updated. The parts, one
concern each: :mod:`subspax._state_types` (the states),
:mod:`subspax._core_config` (the checked options), :mod:`subspax._matrix_loop`
(every matrix of a parameter in turn), :mod:`subspax._transitions` (a refresh
and the moments carried over), :mod:`subspax._reduced_adam` (step 2),
:mod:`subspax._outputs` and :mod:`subspax._recovery` (step 3).

References:
  Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
  Robert et al., LDAdam (moment rotation), https://arxiv.org/abs/2410.16103;
  Chen et al., Fira (recovery scaling), https://arxiv.org/abs/2410.01623;
  Rajabi et al., SubTrack++, https://arxiv.org/abs/2502.01586
"""

from __future__ import annotations

import functools
import typing
from typing import Optional, Union

import jax
import jax.numpy as jnp
import optax

from subspax import _core_config
from subspax import _dense_adam
from subspax import _keys
from subspax import _layout
from subspax import _matrix_loop
from subspax import _policies
from subspax import _quantized
from subspax import _state_types
from subspax import _stored_basis
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
    quantize_moments: Store the Adam moments block-wise in 8 bits
      (docs/algorithms.md section 8.1): ``"off"`` (``mu_dtype`` /
      ``nu_dtype``), ``"linear"`` or ``"quantile"`` levels (the latter dense
      near zero). One code per value and one float32 absmax per 256 values of
      a row; ``nu`` is stored as ``sqrt(nu)`` rounded up, so it never decodes
      below itself. The moments are computed in float32. The Adam moments of
      the parameters that are not projected are stored the same way where a
      parameter is a matrix (or a stack) of rows of at least 256 values (the
      embedding, the head, stacked norm scales); ``mu_dtype`` then only sets
      the ``mu`` of the others (vectors, narrow matrices).
    basis_dtype: dtype the floating-point part of a stored basis is kept in
      (float32 by default; bfloat16 halves a dense basis, as GaLore's 8-bit
      runs keep the projector in the gradients' dtype), or ``"int8"``: a
      dense basis block-wise in 8 bits (one float32 absmax per 256 values of
      a row, a quarter of float32's bytes, as Q-GaLore's low-bit
      projections). It is read into float32 for the projections and for the
      next refresh; a refresh rounds its new basis once, and every later step
      uses the rounded basis.

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

  config = _core_config.Config(
      policy=policy, rank=rank, update_interval=update_interval, b1=b1, b2=b2,
      eps=eps, scale=scale, moments=moments, recovery=recovery,
      recovery_limit=recovery_limit, store_basis=store_basis,
      mu_dtype=jnp.float32 if mu_dtype is None else mu_dtype,
      nu_dtype=jnp.float32 if nu_dtype is None else nu_dtype,
      output=output, scale_type=scale_type, limiter=limiter, prox=prox,
      prox_learning_rate=prox_learning_rate,
      quantize_moments=quantize_moments,
      basis_dtype=_stored_basis.check_dtype(
          jnp.float32 if basis_dtype is None else basis_dtype))
  route = _layout.make_router(projected, rank)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: "subspace" if route(path, p) is not None else "adam",
        params)

  return optax.partition(
      {
          "subspace": _scale_by_projected_adam(config, route, side, key),
          "adam": (optax.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                       mu_dtype=mu_dtype)
                   if quantize_moments == "off" else _dense_adam.scale_by_adam(
                       b1, b2, eps, mu_dtype, quantize_moments)),
      },
      labels)


def _scale_by_projected_adam(config: _core_config.Config, route, side: str,
                             key: KeyLike) -> optax.GradientTransformation:
  """The projected half of :func:`scale_by_subspace_adam` (all leaves routed)."""

  def init_fn(params):
    matrices = jax.tree_util.tree_map_with_path(
        lambda path, p: _init_matrices(config, _layout.make_layout(
            p.shape, route(path, p), config.rank, side)), params)
    return _state_types.SubspaceAdamState(
        count=jnp.zeros([], jnp.int32), key=_keys.key_data(key), matrices=matrices)

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
      if isinstance(leaf_state, _state_types.ProjectedState):
        if not _is_masked(g):
          reduced_g = None if reduced_leaves is None else reduced_leaves[i]
          if reduced_leaves is not None and not hasattr(reduced_g, "shape"):
            raise ValueError(f"reduced= has no reduced gradient for projected "
                             f"parameter {i}.")
          update_parameter = _sharding_agnostic(functools.partial(
              _matrix_loop.update_parameter, config, layer=layer,
              refresh=refresh, refresh_only=refresh_only, reduced=reduced_g))
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
    return treedef.unflatten(new_updates), _state_types.SubspaceAdamState(
        count=(state.count if refresh_only
               else optax.safe_int32_increment(state.count)),
        key=state.key, matrices=new_matrices)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def _is_leaf_state(x) -> bool:
  return isinstance(x, (_state_types.ProjectedState, MaskedNode))


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


def _init_matrices(config: _core_config.Config, layout: _layout.MatrixLayout
                   ) -> _state_types.ProjectedState:
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
    basis = _stored_basis.zeros(config.policy.zeros(d, r),
                                lambda shape: layout.batched(*shape),
                                config.basis_dtype)
  age = MaskedNode()
  if config.moments == "reset":
    age = batched_zeros((), jnp.int32)
  elif config.moments == "overlap":
    age = batched_zeros((r,), jnp.int32)
  return _state_types.ProjectedState(
      basis=basis,
      mu=moment_zeros(config.mu_dtype, signed=True),
      nu=moment_zeros(config.nu_dtype, signed=False),
      age=age,
      last_norm=(batched_zeros((), jnp.float32) if config.tracks_norm
                 else MaskedNode()),
      displacement=(batched_zeros((r, big_d), jnp.float32)
                    if config.uses_prox else MaskedNode()),
      layout=layout)



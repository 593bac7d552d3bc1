"""The shared core: Adam whose moments live in a reduced subspace.

Every method in subspax is this one transformation with a different
:class:`~subspax.SubspacePolicy` (how the subspace is chosen and moved) and a
moment policy (what happens to the Adam moments when the subspace changes).
The step is ALGORITHMS.md section 1:

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
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from subspax import _layout
from subspax import _policies
from subspax import _validation

MOMENTS = ("keep", "reset", "rotate", "overlap")
OUTPUTS = ("back", "scaled_gradient")
SCALE_TYPES = ("channel", "tensor")
LIMITERS = ("corrected", "uncorrected", "off")
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
    mu: First moment, ``(*B, r, D)``, ``mu_dtype`` (float32 by default).
    nu: Second moment, ``(*B, r, D)``, ``nu_dtype`` (float32 by default).
    age: Steps accumulated in the moments since their last reset, int32:
      ``(*B,)`` for ``moments="reset"``, ``(*B, r)`` per row for
      ``"overlap"``; ``MaskedNode`` otherwise (the global count is used).
    last_norm: ``||Lambda||_F`` of the last recovery term, ``(*B,)`` float32;
      ``MaskedNode`` when recovery is off.
    displacement: RSO's proximal state ``B``, the reduced displacement of the
      parameter since the last refresh, ``(*B, r, D)`` float32 (zero after
      every refresh); ``MaskedNode`` when ``prox`` is 0.
    layout: Static: how the parameter maps to canonical matrices.
  """

  basis: Any
  mu: jax.Array
  nu: jax.Array
  age: Any
  last_norm: Any
  displacement: Any
  layout: _layout.MatrixLayout


class SubspaceAdamState(NamedTuple):
  """State of the projected part of :func:`scale_by_subspace_adam`."""

  count: jax.Array  # shape=(), int32: steps taken
  key: jax.Array  # shape=(2,), uint32: raw PRNG key data (checkpointable)
  matrices: optax.Params  # ProjectedState per projected leaf, else MaskedNode


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
  prox: Any = 0.0
  prox_learning_rate: Any = 1.0

  @property
  def uses_prox(self) -> bool:
    """Whether RSO's proximal term (and its displacement state) is on."""
    return not _policies._is_zero(self.prox)  # pylint: disable=protected-access

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
    moments: str = "keep",
    recovery: bool = False,
    recovery_limit: float = 1.01,
    side: str = "auto",
    projected: _layout.Projected = None,
    store_basis: bool = True,
    key: KeyLike = 0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    output: str = "back",
    scale_type: str = "channel",
    limiter: str = "corrected",
    prox: float = 0.0,
    prox_learning_rate: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformation:
  """Adam with moments in a reduced subspace chosen by ``policy``.

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
    recovery: Add Fira's scaled residual ``G - back(R)`` to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    side: ``"auto"`` projects the smaller matrix dimension; ``"left"`` or
      ``"right"`` force one (ALGORITHMS.md section 0).
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
    prox: RSO's proximal coefficient ``1 / eta_k`` (ALGORITHMS.md 2.5): adds
      ``prox * B`` to the reduced gradient, ``B`` the reduced displacement of
      the parameter since the last refresh (an extra ``r x D`` state, reset at
      every refresh). 0 turns it off.
    prox_learning_rate: The learning rate (float or schedule) chained after
      this transformation, used only to accumulate ``B``: the step moves the
      parameter by ``-prox_learning_rate(t) * scale * back(N)``. The method
      aliases (``subspax.rso``) pass their own ``learning_rate``.

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
  _validation.choice("moments", moments, MOMENTS)
  _validation.choice("side", side, _layout.SIDES)
  _validation.in_range("recovery_limit", recovery_limit, 1.0, float("inf"))
  _validation.choice("output", output, OUTPUTS)
  _validation.choice("scale_type", scale_type, SCALE_TYPES)
  _validation.choice("limiter", limiter, LIMITERS)
  if output == "scaled_gradient" and recovery:
    raise ValueError('output="scaled_gradient" already scales the whole '
                     'gradient; set recovery=False.')
  if limiter == "uncorrected" and moments == "overlap":
    raise ValueError('limiter="uncorrected" needs one step count per matrix; '
                     'moments="overlap" counts per row. Use "corrected".')
  if moments == "overlap" and not isinstance(policy, _policies.RowSubspace):
    raise ValueError('moments="overlap" needs a row-selection policy '
                     '(subspax.grass); use "rotate" for dense bases.')
  if recovery and not policy.orthonormal:
    raise ValueError("recovery=True needs an orthonormal basis; the Gaussian "
                     "basis (orthonormal=False) has none. Turn one of them off.")
  if not store_basis and not policy.key_only:
    raise ValueError(
        f"store_basis=False needs a basis that depends on the key alone "
        f"(grassjump, rso); {type(policy).__name__} depends on the gradient.")
  _validation.non_negative("prox", prox)
  if not _policies._is_zero(prox) and (recovery or output != "back"):  # pylint: disable=protected-access
    raise ValueError("prox > 0 tracks the reduced displacement only; it needs "
                     'recovery=False and output="back" (or set prox=0).')

  config = _Config(
      policy=policy, rank=rank, update_interval=update_interval, b1=b1, b2=b2,
      eps=eps, scale=scale, moments=moments, recovery=recovery,
      recovery_limit=recovery_limit, store_basis=store_basis,
      mu_dtype=jnp.float32 if mu_dtype is None else mu_dtype,
      nu_dtype=jnp.float32 if nu_dtype is None else nu_dtype,
      output=output, scale_type=scale_type, limiter=limiter, prox=prox,
      prox_learning_rate=prox_learning_rate)
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

  def update_fn(updates, state, params=None):
    del params
    base_key = jax.random.wrap_key_data(state.key)
    flat, treedef = jax.tree.flatten(updates)
    leaf_states = treedef.flatten_up_to(state.matrices)
    results = [
        _sharding_agnostic(functools.partial(_update_parameter, config))(
            g, leaf_state, state.count, jax.random.fold_in(base_key, index))
        for index, (g, leaf_state) in enumerate(zip(flat, leaf_states))
    ]
    new_updates = treedef.unflatten([u for u, _ in results])
    new_matrices = treedef.unflatten([s for _, s in results])
    return new_updates, SubspaceAdamState(
        count=optax.safe_int32_increment(state.count), key=state.key,
        matrices=new_matrices)

  return optax.GradientTransformation(init_fn, update_fn)


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


def _init_matrices(config: _Config, layout: _layout.MatrixLayout
                   ) -> ProjectedState:
  """Zero state of one projected parameter."""
  r, d, big_d = layout.rank, layout.d, layout.D

  def batched_zeros(trailing, dtype):
    return jnp.zeros(layout.batched(*trailing), dtype)

  basis = MaskedNode()
  if config.stores_basis:
    basis = jax.tree.map(lambda a: batched_zeros(a.shape, a.dtype),
                         config.policy.zeros(d, r))
  age = MaskedNode()
  if config.moments == "reset":
    age = batched_zeros((), jnp.int32)
  elif config.moments == "overlap":
    age = batched_zeros((r,), jnp.int32)
  return ProjectedState(
      basis=basis,
      mu=batched_zeros((r, big_d), config.mu_dtype),
      nu=batched_zeros((r, big_d), config.nu_dtype),
      age=age,
      last_norm=(batched_zeros((), jnp.float32) if config.tracks_norm
                 else MaskedNode()),
      displacement=(batched_zeros((r, big_d), jnp.float32)
                    if config.uses_prox else MaskedNode()),
      layout=layout)


class _MatrixState(NamedTuple):
  """The per-matrix slice of a ProjectedState (what the core vmaps over)."""

  basis: Any
  mu: jax.Array
  nu: jax.Array
  age: Any
  last_norm: Any
  displacement: Any


def _update_parameter(config: _Config, g: jax.Array, state: ProjectedState,
                      count: jax.Array, key: jax.Array):
  """Updates every matrix of one projected parameter.

  The refresh runs one matrix at a time (``lax.map``) inside a single
  ``lax.cond``: its workspace is that of one matrix, and CPU LAPACK calls are
  not batched (batched ones can deadlock jaxlib 0.10's CPU runtime with many
  devices). The Adam step is vmapped over the stacked matrices.
  """
  layout = state.layout
  nb = len(layout.batch_shape)
  num = layout.num_matrices
  fields = _MatrixState(state.basis, state.mu, state.nu, state.age,
                        state.last_norm, state.displacement)
  flat_fields = jax.tree.map(lambda a: a.reshape((num,) + a.shape[nb:]),
                             fields)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))

  def refresh_all(fields):
    # The canonical (transposed, for side "right") gradient is formed inside
    # the branch: as a cond operand it would be materialised at every step.
    refresh_one = functools.partial(_refresh_matrix, config, count=count,
                                    right=layout.side == "right")
    return jax.lax.map(lambda args: refresh_one(*args),
                       (layout.to_canonical(g), fields, keys))

  flat_fields = jax.lax.cond(count % config.update_interval == 0, refresh_all,
                             lambda f: f, flat_fields)
  if config.stores_basis:
    bases = flat_fields.basis
  else:
    epoch_keys = jax.vmap(lambda k: _epoch_key(config, k, count))(keys)
    bases = jax.lax.map(
        lambda k: config.policy.sample(k, layout.d, layout.rank), epoch_keys)
  # The step works on each matrix as stored, (m, n): for side "right" the
  # basis acts on the columns (`_RightSide`), so G and the update are never
  # transposed (two m x n copies per step otherwise).
  right = layout.side == "right"
  step = functools.partial(_adam_step, config, count=count, right=right)
  g_matrices = layout.to_matrices(g)
  directions, kept_scales, new_fields = jax.vmap(step)(g_matrices, bases,
                                                       flat_fields)
  if directions is None:
    updates = jax.vmap(functools.partial(_scale_kept_side, right=right))(
        kept_scales, g_matrices)
  elif kept_scales is None:
    updates = jax.vmap(lambda b, x: _oriented(b, right).back(x, layout.d))(
        bases, directions)
  else:
    updates = jax.vmap(functools.partial(
        _back_plus_scaled_gradient, d=layout.d, right=right))(
            bases, directions, kept_scales, g_matrices)
  new_fields = jax.tree.map(
      lambda a, old: a.reshape(old.shape).astype(old.dtype), new_fields, fields)
  return layout.from_matrices(updates, g.dtype), ProjectedState(
      *new_fields, layout=layout)


def _back_plus_scaled_gradient(basis, direction, kept_scale, g, *, d: int,
                               right: bool) -> jax.Array:
  """The recovery update ``back(X) + diag(phi) G`` of one matrix."""
  kept_scale = kept_scale[:, None] if right else kept_scale
  return _oriented(basis, right).back(direction, d) + kept_scale * g


def _epoch_key(config: _Config, key: jax.Array, count: jax.Array,
               offset: int = 0) -> jax.Array:
  """The key of the subspace in use at step ``count`` (``offset`` epochs on)."""
  return jax.random.fold_in(key, count // config.update_interval + offset)


def _refresh_matrix(config: _Config, g: jax.Array, state: _MatrixState,
                    key: jax.Array, *, count: jax.Array,
                    right: bool = False) -> _MatrixState:
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
    new = _new_basis(policy, old, g, epoch_key, r, count, right=right)
    stored = new
  else:
    old = policy.sample(_epoch_key(config, key, count, offset=-1), d, r)
    new = policy.sample(epoch_key, d, r)
    stored = state.basis
  mu, nu, age = _transition(config.moments, old, new, state.mu, state.nu,
                            state.age)
  displacement = jax.tree.map(jnp.zeros_like, state.displacement)
  return _MatrixState(stored, mu, nu, age, state.last_norm, displacement)


class _RightSide(NamedTuple):
  """A basis applied to a side-"right" matrix as stored, ``(D, d)``.

  ``project(G) = (G S)^T``, ``back(X) = X^T S^T``: the canonical formulas of
  the wrapped basis on ``G^T``, with the transposes on the small ``r x D``
  side.
  """

  basis: Any

  def project(self, g: jax.Array) -> jax.Array:
    return self.basis.coords(g).T

  def back(self, x: jax.Array, d: int) -> jax.Array:
    return self.basis.embed(x.T, d)

  def residual_sq_norm(self, g, r, phi) -> jax.Array:
    return self.basis.residual_sq_norm(g.T, r, phi)


def _oriented(basis, right: bool):
  return _RightSide(basis) if right else basis


def _adam_step(config: _Config, g: jax.Array, basis, state: _MatrixState, *,
               count: jax.Array, right: bool):
  """One reduced-space Adam step on one matrix ``g`` as stored, ``(m, n)``.

  The math is that of the canonical ``(d, D)`` matrix (``G^T`` when
  ``right``).

  Returns:
    ``(X, phi, state)``: the update is ``back(X) + diag(phi) G`` (in ``g``'s
    orientation), with ``phi`` (``(D,)``) the recovery scales, ``None``
    without recovery; and the new per-matrix state.
  """
  basis = _oriented(basis, right)
  reduced = basis.project(g)
  adam_input = reduced
  if config.uses_prox:  # RSO's proximal term: Adam sees R + prox * B.
    adam_input = reduced + config.prox * state.displacement
  mu = config.b1 * state.mu.astype(jnp.float32) + (1 - config.b1) * adam_input
  nu = config.b2 * state.nu.astype(jnp.float32) + (1 - config.b2) * jnp.square(
      adam_input)
  age = state.age
  if isinstance(age, MaskedNode):
    steps = optax.safe_int32_increment(count)
  else:
    age = optax.safe_int32_increment(age)
    steps = age[:, None] if age.ndim else age
  mu_hat = mu / (1 - config.b1**steps)
  nu_hat = nu / (1 - config.b2**steps)
  normalized = mu_hat / (jnp.sqrt(nu_hat) + config.eps)

  last_norm, kept_scale = state.last_norm, None
  direction = config.scale * normalized
  if config.output == "scaled_gradient":
    direction, kept_scale, last_norm = _scaled_gradient(
        config, g, reduced, normalized, last_norm, steps, right=right)
  elif config.recovery:
    direction, kept_scale, last_norm = _with_recovery(
        config, basis, g, reduced, normalized, last_norm, steps)
  displacement = state.displacement
  if config.uses_prox:  # B moves with the parameter: -lr(t) * scale * N.
    lr = config.prox_learning_rate
    lr = lr(count) if callable(lr) else lr
    displacement = displacement - lr * config.scale * normalized
  return direction, kept_scale, _MatrixState(state.basis, mu, nu, age,
                                             last_norm, displacement)


def _new_basis(policy, old, g, key, r, count, *, right: bool = False):
  """Initial or refreshed basis; keeps ``old`` when ``g`` is not finite."""
  refresh = functools.partial(policy.refresh_oriented, right=right)
  if type(policy).initial is _policies.SubspacePolicy.initial:
    new = refresh(old, g, key, r)
  else:
    new = jax.lax.cond(count == 0, lambda: policy.initial(g, key, r),
                       lambda: refresh(old, g, key, r))
  finite = jnp.all(jnp.isfinite(g))
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def _transition(moments: str, old, new, mu, nu, age):
  """Applies the moment policy at a basis change ``old -> new``."""
  if moments == "keep":
    return mu, nu, age
  if moments == "reset":
    return jnp.zeros_like(mu), jnp.zeros_like(nu), jnp.zeros_like(age)
  if moments == "overlap":
    return _carry_rows(old, new, mu, nu, age)
  c = new.gram(old)  # (r, r): reduced coordinates old -> new
  mu32, nu32 = mu.astype(jnp.float32), nu.astype(jnp.float32)
  new_mu = c @ mu32
  new_nu = jnp.abs(jnp.square(c) @ (nu32 - jnp.square(mu32))
                   + jnp.square(new_mu))
  return new_mu.astype(mu.dtype), new_nu.astype(nu.dtype), age


def _carry_rows(old, new, mu, nu, age):
  """``moments="overlap"``: each new slot takes one old slot of its row.

  A kept row changes scale from ``rho_old`` to ``rho_new``, so its ``mu`` is
  multiplied by ``rho_new / rho_old`` and its ``nu`` by the square. It is a
  gather (never a sum of slots, never ``0 * NaN`` from other rows); slots
  with no old row, or whose carried moments are not finite, start at zero.
  """
  source, ratio, found = new.overlap(old)
  new_mu = mu.astype(jnp.float32)[source] * ratio[:, None]
  new_nu = nu.astype(jnp.float32)[source] * jnp.square(ratio)[:, None]
  keep = found & jnp.all(jnp.isfinite(new_mu) & jnp.isfinite(new_nu), axis=1)
  new_mu = jnp.where(keep[:, None], new_mu, 0.0)
  new_nu = jnp.where(keep[:, None], new_nu, 0.0)
  new_age = jnp.where(keep, age[source], 0)
  return new_mu.astype(mu.dtype), new_nu.astype(nu.dtype), new_age


def _with_recovery(config: _Config, basis, g, reduced, normalized, last_norm,
                   steps):
  """Fira recovery scaling with the norm-growth limiter.

  ``Lambda = (G - back(R)) diag(phi)``, ``phi_j = ||N_j|| / (||R_j|| + 1e-8)``,
  limited so that ``||Lambda||`` grows by at most ``recovery_limit`` per step.
  Uses ``U = back(scale N - f phi R) + f phi G`` (``back`` is linear), so no
  ``d x D`` residual is formed besides the output.

  Returns:
    ``(scale N - f phi R, f phi, ||Lambda||)``.
  """
  phi = _kept_scales(config, reduced, normalized)
  norm = jnp.sqrt(basis.residual_sq_norm(g, reduced, phi))
  factor, last_norm = _limit_growth(config, norm, last_norm, steps)
  scaled_phi = factor * phi
  return (config.scale * normalized - scaled_phi * reduced, scaled_phi,
          last_norm)


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
    norm = norm * (1 - config.b1**steps) / jnp.sqrt(1 - config.b2**steps)
  limit = config.recovery_limit * last_norm
  too_big = (last_norm > 0) & (norm > limit)
  factor = jnp.where(too_big, limit / jnp.where(norm > 0, norm, 1.0), 1.0)
  return factor, norm * factor


def _scaled_gradient(config: _Config, g, reduced, normalized, last_norm,
                     steps, *, right: bool):
  """APOLLO's update ``scale * f * G diag(s)`` of one matrix ``g`` as stored.

  ``s`` (:func:`_kept_scales`) scales the kept side of ``g``; ``f`` is the
  norm-growth limiter's factor for ``||G diag(s)||_F``, computed from the
  kept columns' norms, so no ``m x n`` buffer besides the output.

  Returns:
    ``(None, scale * f * s, new_last_norm)``: ``None`` marks "no
    back-projection" for the caller.
  """
  s = _kept_scales(config, reduced, normalized)
  g_sq = jnp.sum(jnp.square(g), axis=1 if right else 0)
  norm = jnp.sqrt(jnp.sum(jnp.square(s) * g_sq))
  factor, last_norm = _limit_growth(config, norm, last_norm, steps)
  return None, config.scale * factor * s, last_norm


def _scale_kept_side(kept_scale, g, *, right: bool) -> jax.Array:
  """``G diag(s)`` along the kept side of ``g`` as stored."""
  return (kept_scale[:, None] if right else kept_scale) * g


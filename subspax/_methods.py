"""The six subspace methods: a policy on the shared core, the papers' defaults.

Each method has two layers, as in optax: ``scale_by_<method>`` is the pure
rescaling (no learning rate) and ``<method>(learning_rate, ...)`` chains
decoupled weight decay and the learning rate after it. The defaults are the
papers' (docs/algorithms.md section 6); the math of each policy is in section 5.

References:
  Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
  Rajabi, Nonta, Rambhatla, SubTrack++, https://arxiv.org/abs/2502.01586;
  Rajabi et al., Randomized Gradient Subspaces (GrassWalk, GrassJump),
  https://arxiv.org/abs/2510.01878;
  Chen et al., RSO, https://arxiv.org/abs/2502.07222;
  Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from subspax import _core
from subspax import _layout
from subspax import _policies
from subspax import _types
from subspax import _validation


def with_learning_rate(transform: optax.GradientTransformation,
                       learning_rate: optax.ScalarOrSchedule,
                       weight_decay: Any, mask: Any
                       ) -> optax.GradientTransformation:
  """``chain(transform, add_decayed_weights, scale_by_learning_rate)``.

  The user-facing layer of every method (``subspax.<method>`` over
  ``subspax.scale_by_<method>``), shared by this module and ``_apollo``.
  """
  return optax.chain(transform,
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def scale_by_galore(
    rank: int = 128, update_interval: int = 200, *, scale: float = 0.25,
    align_signs: bool = False, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GaLore's rescaling: Adam on the top-``r`` singular subspace of ``G``.

  Every ``update_interval`` steps the basis becomes the top-``r`` singular
  vectors of the current gradient (an exact SVD); the Adam moments are kept
  across the change. The update is ``scale`` times the back-projected Adam
  step. It is the baseline the other methods improve on: its refresh is a
  full SVD of every projected gradient.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = optax.chain(subspax.scale_by_galore(rank=2, update_interval=10),
    ...                  optax.scale(-1e-2))  # a plain descent step
    >>> grads = {'w': jnp.ones((8, 16))}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates['w'].shape
    (8, 16)

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between SVD refreshes ``T``.
    scale: Back-projection scale ``alpha``.
    align_signs: Flip each new singular vector that points against the old
      one (``diag(S_new^T S_old) >= 0``), so that an arbitrary sign flip of
      the SVD does not negate rows of the kept first moment.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507
  """
  return _core.scale_by_subspace_adam(
      _policies.SvdSubspace(align_signs=align_signs), rank, update_interval,
      b1=b1, b2=b2, eps=eps, scale=scale, moments="keep", recovery=False,
      side=side, projected=projected, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def galore(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, scale: float = 0.25,
    align_signs: bool = False, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GaLore with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_galore(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> schedule = optax.cosine_decay_schedule(1e-2, decay_steps=100)
    >>> tx = subspax.galore(schedule, rank=4, update_interval=10,
    ...                     weight_decay=0.1, align_signs=True)
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between SVD refreshes ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    scale: Back-projection scale ``alpha``.
    align_signs: Flip each new singular vector towards the old one, so the
      kept first moment keeps its signs.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507
  """
  return with_learning_rate(
      scale_by_galore(rank, update_interval, scale=scale,
                      align_signs=align_signs, b1=b1, b2=b2, eps=eps,
                      side=side, projected=projected, mu_dtype=mu_dtype,
                      nu_dtype=nu_dtype,
                      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def _geodesic_eta(step: str, eta: Optional[float]) -> float:
  """SubTrack++'s ``eta`` after validation (``None``: the step rule's own)."""
  _validation.choice("step", step, _policies.GEODESIC_STEPS)
  if eta is None:
    eta = (_policies.OPTIMAL_DAMPING if step == "optimal"
           else _policies.PAPER_ETA)
  _validation.non_negative("eta", eta)
  if step == "optimal":
    _validation.in_range("eta", eta, 0.0, 1.0, closed_high=True)
  return eta


def scale_by_subtrack(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    eta: Optional[float] = None, step: _types.GeodesicStep = "optimal",
    init: _types.Init = "randomized", scale: float = 0.25,
    recovery: bool = True, recovery_limit: float = 1.01, b1: float = 0.9,
    b2: float = 0.999, eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """SubTrack++'s rescaling: Adam in a subspace tracked along geodesics.

  Every ``update_interval`` steps the basis takes one step along a geodesic of
  the Grassmannian that lowers the projection error ``||G - S S^T G||_F``;
  only the first basis needs a (randomized) SVD. The Adam moments are rotated
  into the new basis, and the part of the gradient outside the subspace is
  added back with Fira's recovery scaling.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_subtrack(rank=2, update_interval=10, init='svd')
    >>> grads = {'w': jnp.ones((8, 16))}
    >>> update = jax.jit(tx.update)
    >>> updates, state = update(grads, tx.init(grads))
    >>> updates, state = update(grads, state)  # compiled once

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between geodesic steps ``T``.
    key: PRNG key or int seed (of the randomized first basis).
    eta: Step size of the geodesic step, read by ``step``. ``None``: 1 for
      ``"optimal"`` (the best angle itself), the paper scripts' 10 for the
      other rules.
    step: How far to move. ``"optimal"``: ``eta`` (a damping factor in
      ``[0, 1]``) times the angle that minimises the projection error along
      the geodesic, in closed form, so a refresh never increases it;
      ``"normalized"``: the angle ``eta sigma / ||G||_F^2``, at most pi/4;
      ``"raw"``: the angle ``eta sigma`` (the paper's rule); ``"angle"``:
      ``eta`` radians.
    init: The first basis: ``"randomized"`` range finder or exact ``"svd"``.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi, Nonta, Rambhatla, SubTrack++, https://arxiv.org/abs/2502.01586
  """
  eta = _geodesic_eta(step, eta)
  _validation.choice("init", init, _policies.INITS)
  policy = _policies.GeodesicSubspace(eta=eta, step=step, tangent="gradient",
                                      init=init)
  return _core.scale_by_subspace_adam(
      policy, rank, update_interval, b1=b1, b2=b2, eps=eps, scale=scale,
      moments="rotate", recovery=recovery, recovery_limit=recovery_limit,
      side=side, projected=projected, key=key, mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def subtrack(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    eta: Optional[float] = None, step: _types.GeodesicStep = "optimal",
    init: _types.Init = "randomized", scale: float = 0.25,
    recovery: bool = True, recovery_limit: float = 1.01, b1: float = 0.9,
    b2: float = 0.999, eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """SubTrack++ with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_subtrack(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> loss = lambda p: jnp.sum(jnp.sin(p['w']) ** 2)
    >>> params = {'w': jnp.ones((16, 32))}
    >>> tx = subspax.subtrack(1e-2, rank=4, update_interval=2)
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < loss({'w': jnp.ones((16, 32))}))
    True

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between geodesic steps ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or int seed (of the randomized first basis).
    eta: Step size of the geodesic step (``None``: 1 for ``"optimal"``, 10
      for the other rules).
    step: ``"optimal"`` (default), ``"normalized"``, ``"raw"`` or
      ``"angle"``; see :func:`scale_by_subtrack`.
    init: The first basis: ``"randomized"`` range finder or exact ``"svd"``.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi, Nonta, Rambhatla, SubTrack++, https://arxiv.org/abs/2502.01586
  """
  return with_learning_rate(
      scale_by_subtrack(rank, update_interval, key=key, eta=eta, step=step,
                        init=init, scale=scale, recovery=recovery,
                        recovery_limit=recovery_limit, b1=b1, b2=b2, eps=eps,
                        side=side, projected=projected, mu_dtype=mu_dtype,
                        nu_dtype=nu_dtype,
                        quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def scale_by_grasswalk(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    eta: float = 0.1, jump_prob: float = 0.0, init: _types.Init = "randomized",
    scale: float = 0.25, recovery: bool = True, recovery_limit: float = 1.01,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GrassWalk's rescaling: a random geodesic step every ``T`` steps.

  Like SubTrack++, but the geodesic follows a random tangent direction and
  turns the basis by a fixed angle ``eta``; the moments are rotated and the
  residual is recovered. With ``jump_prob > 0`` a refresh may instead jump to
  a fresh Haar-random subspace (the GrassWalk / GrassJump hybrid).

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_grasswalk(rank=2, update_interval=10, eta=0.1)
    >>> layers = {'w': jnp.ones((3, 8, 16))}  # one subspace per layer
    >>> updates, state = tx.update(layers, tx.init(layers))
    >>> updates['w'].shape
    (3, 8, 16)

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between random steps ``T``.
    key: PRNG key or int seed.
    eta: Rotation angle of one refresh, in radians.
    jump_prob: Probability that a refresh jumps to a Haar-random subspace
      instead (0: a pure walk).
    init: The first basis: ``"randomized"`` range finder or exact ``"svd"``.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  _validation.choice("init", init, _policies.INITS)
  _validation.non_negative("eta", eta)
  _validation.in_range("jump_prob", jump_prob, 0.0, 1.0, closed_high=True)
  policy = _policies.GeodesicSubspace(eta=eta, step="angle", tangent="random",
                                      init=init, jump_prob=jump_prob)
  return _core.scale_by_subspace_adam(
      policy, rank, update_interval, b1=b1, b2=b2, eps=eps, scale=scale,
      moments="rotate", recovery=recovery, recovery_limit=recovery_limit,
      side=side, projected=projected, key=key, mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def grasswalk(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0, eta: float = 0.1,
    jump_prob: float = 0.0, init: _types.Init = "randomized",
    scale: float = 0.25, recovery: bool = True, recovery_limit: float = 1.01,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GrassWalk with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_grasswalk(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = optax.inject_hyperparams(
    ...     subspax.grasswalk, static_args=('rank', 'update_interval'))(
    ...         learning_rate=1e-2, rank=4, update_interval=10, jump_prob=0.3)
    >>> params = {'w': jnp.ones((16, 32))}
    >>> state = tx.init(params)
    >>> round(float(state.hyperparams['jump_prob']), 6)
    0.3

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between random steps ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or int seed.
    eta: Rotation angle of one refresh, in radians.
    jump_prob: Probability that a refresh jumps to a Haar-random subspace
      instead (0: a pure walk).
    init: The first basis: ``"randomized"`` range finder or exact ``"svd"``.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  return with_learning_rate(
      scale_by_grasswalk(rank, update_interval, key=key, eta=eta,
                         jump_prob=jump_prob, init=init, scale=scale,
                         recovery=recovery, recovery_limit=recovery_limit,
                         b1=b1, b2=b2, eps=eps, side=side,
                         projected=projected, mu_dtype=mu_dtype,
                         nu_dtype=nu_dtype,
                         quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def scale_by_grassjump(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    store_basis: bool = True, scale: float = 0.25, recovery: bool = True,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GrassJump's rescaling: a fresh Haar-random subspace every ``T`` steps.

  No SVD at all: every basis, the first included, is the ``Q`` factor of a
  Gaussian matrix. The moments are rotated into each new basis and the
  residual is recovered. With ``store_basis=False`` the basis is rebuilt
  from the key at every step (one thin QR) and takes no state.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> only_w = lambda path, p: path[0].key == 'w'  # 'v' gets plain Adam
    >>> tx = subspax.scale_by_grassjump(rank=2, update_interval=10,
    ...                                 projected=only_w)
    >>> grads = {'w': jnp.ones((8, 16)), 'v': jnp.ones((8, 16))}
    >>> updates, state = tx.update(grads, tx.init(grads))

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between jumps ``T``.
    key: PRNG key or int seed.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  return _core.scale_by_subspace_adam(
      _policies.RandomSubspace(orthonormal=True), rank, update_interval,
      b1=b1, b2=b2, eps=eps, scale=scale, moments="rotate", recovery=recovery,
      recovery_limit=recovery_limit, side=side, projected=projected,
      store_basis=store_basis, key=key, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def grassjump(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    store_basis: bool = True, scale: float = 0.25, recovery: bool = True,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GrassJump with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_grassjump(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> params = {'w': jnp.zeros((64, 64))}
    >>> stored = subspax.grassjump(1e-2, rank=8)
    >>> rebuilt = subspax.grassjump(1e-2, rank=8, store_basis=False)
    >>> bytes_of = lambda tx: subspax.state_bytes(tx.init(params))
    >>> bytes_of(stored) - bytes_of(rebuilt)  # the 64 x 8 float32 basis
    2048

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between jumps ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or int seed.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    recovery: Add Fira's scaled residual to the update.
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  return with_learning_rate(
      scale_by_grassjump(rank, update_interval, key=key,
                         store_basis=store_basis, scale=scale,
                         recovery=recovery, recovery_limit=recovery_limit,
                         b1=b1, b2=b2, eps=eps, side=side,
                         projected=projected, mu_dtype=mu_dtype,
                         nu_dtype=nu_dtype,
                         quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def scale_by_rso(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    orthonormal: bool = True, store_basis: bool = True, scale: float = 1.0,
    prox: Optional[float] = None,
    prox_learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """RSO's rescaling: Adam on random subspace subproblems of ``T`` steps.

  Each block of ``update_interval`` steps is one subproblem in a random
  subspace (Haar-random, or Gaussian with ``N(0, 1/r)`` entries when
  ``orthonormal=False``); the moments are reset when it starts and nothing
  outside the subspace is recovered. ``prox > 0`` adds the paper's proximal
  term to the reduced gradient.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_rso(rank=2, update_interval=10,
    ...                           orthonormal=False, side='right')
    >>> grads = {'w': jnp.ones((8, 16))}  # the basis spans 2 of the 16 columns
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates['w'].shape
    (8, 16)

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps per subproblem ``T``.
    key: PRNG key or int seed.
    orthonormal: A Haar-random orthonormal basis, or a Gaussian one.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    prox: The proximal coefficient ``1 / eta_k`` of the subproblem
      ``f(W + S B) + ||B||_F^2 / (2 eta_k)``: adds ``prox * B`` to the
      reduced gradient, ``B`` the parameter's reduced displacement since the
      last refresh (an extra ``r x D`` state). ``None`` (default) turns it
      off and keeps no ``B``; a number, 0 included, keeps ``B``, so that the
      state has the same fields under ``optax.inject_hyperparams``. The same
      value as the trainer's ``opt.rso.prox`` gives the same steps.
    prox_learning_rate: The learning rate chained after this transformation,
      needed to accumulate ``B`` (:func:`subspax.rso` passes its own).
      Weight decay is not part of ``B``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Chen et al., RSO, https://arxiv.org/abs/2502.07222
  """
  return _core.scale_by_subspace_adam(
      _policies.RandomSubspace(orthonormal=orthonormal), rank, update_interval,
      b1=b1, b2=b2, eps=eps, scale=scale, moments="reset", recovery=False,
      side=side, projected=projected, store_basis=store_basis, key=key,
      mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype, prox=prox,
      prox_learning_rate=prox_learning_rate)


def rso(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    orthonormal: bool = True, store_basis: bool = True, scale: float = 1.0,
    prox: Optional[float] = None,
    prox_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """RSO (random subspace optimization) with weight decay and a learning rate.

  ``optax.chain(scale_by_rso(..., prox_learning_rate=learning_rate),
  optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> tx = subspax.rso(1e-2, rank=4, update_interval=10, prox=1.0,
    ...                  weight_decay=0.1, mask={'w': True, 'b': False})
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.ones((32,))}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(float(updates['b'][0]), 6)  # Adam's first step, no decay
    -0.01

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps per subproblem ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or int seed.
    orthonormal: A Haar-random orthonormal basis, or a Gaussian one.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    prox: The proximal coefficient ``1 / eta_k`` (None: off); see
      :func:`scale_by_rso`.
    prox_learning_rate: The learning rate that moves the reduced
      displacement ``B``; ``None`` (default) uses ``learning_rate``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Chen et al., RSO, https://arxiv.org/abs/2502.07222
  """
  if prox_learning_rate is None:
    prox_learning_rate = learning_rate
  return with_learning_rate(
      scale_by_rso(rank, update_interval, key=key, orthonormal=orthonormal,
                   store_basis=store_basis, scale=scale, prox=prox,
                   prox_learning_rate=prox_learning_rate, b1=b1, b2=b2,
                   eps=eps, side=side, projected=projected,
                   mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                   quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def scale_by_grass(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    selection: _types.Selection = "multinomial", replacement: bool = False,
    keep_overlap: bool = False, scale: float = 1.0, recovery: bool = False,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GRASS's rescaling: Adam on ``r`` selected, scaled rows of each gradient.

  The "basis" is ``r`` row indices and ``r`` scales. Every
  ``update_interval`` steps the rows are selected anew from the gradient's
  row norms and the moments are reset (with ``keep_overlap``, the moments of
  rows selected both times are carried over).

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_grass(rank=2, update_interval=10,
    ...                             selection='topk')
    >>> grads = {'w': jnp.arange(8.0)[:, None] * jnp.ones((8, 16))}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> jnp.nonzero(updates['w'].any(axis=1))[0].tolist()  # the largest rows
    [6, 7]

  Args:
    rank: Number of rows ``r``.
    update_interval: Steps between selections ``T``.
    key: PRNG key or int seed.
    selection: ``"topk"`` (the largest row norms), ``"multinomial"``
      (probabilities proportional to the row norms) or ``"uniform"``.
    replacement: Sample with replacement (unbiased scales) or without.
    keep_overlap: Keep the moments of rows selected before and after a
      refresh.
    scale: Back-projection scale ``alpha``.
    recovery: Add the scaled unselected rows back (off in the paper).
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
  """
  _validation.choice("selection", selection, _policies.SELECTIONS)
  return _core.scale_by_subspace_adam(
      _policies.RowSubspace(selection=selection, replacement=replacement),
      rank, update_interval, b1=b1, b2=b2, eps=eps, scale=scale,
      moments="overlap" if keep_overlap else "reset", recovery=recovery,
      recovery_limit=recovery_limit, side=side, projected=projected, key=key,
      mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def grass(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    selection: _types.Selection = "multinomial", replacement: bool = False,
    keep_overlap: bool = False, scale: float = 1.0, recovery: bool = False,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """GRASS (structured sparse rows) with weight decay and a learning rate.

  ``optax.chain(scale_by_grass(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> tx = subspax.grass(1e-2, rank=4, update_interval=10,
    ...                    replacement=True, keep_overlap=True)
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> int(updates['w'].any(axis=1).sum()) <= 4  # at most r rows move
    True

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Number of rows ``r``.
    update_interval: Steps between selections ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or int seed.
    selection: ``"topk"``, ``"multinomial"`` (norm-proportional) or
      ``"uniform"``.
    replacement: Sample with replacement (unbiased scales) or without.
    keep_overlap: Keep the moments of rows selected before and after a
      refresh.
    scale: Back-projection scale ``alpha``.
    recovery: Add the scaled unselected rows back (off in the paper).
    recovery_limit: Norm-growth limiter ``zeta`` of the recovery term.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"`` or
      ``"right"``.
    projected: Which parameters to project (see
      :func:`~subspax.scale_by_subspace_adam`).
    mu_dtype: dtype of the reduced first moments (float32 by default).
    nu_dtype: dtype of the reduced second moments (float32 by default).
    quantize_moments: ``"off"``, or store the reduced moments block-wise
      in 8 bits on ``"linear"`` or ``"quantile"`` levels (see
      :func:`~subspax.scale_by_subspace_adam`).
    basis_dtype: dtype the basis is stored in (float32 by default; it is
      used in float32, see :func:`~subspax.scale_by_subspace_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
  """
  return with_learning_rate(
      scale_by_grass(rank, update_interval, key=key, selection=selection,
                     replacement=replacement, keep_overlap=keep_overlap,
                     scale=scale, recovery=recovery,
                     recovery_limit=recovery_limit, b1=b1, b2=b2, eps=eps,
                     side=side, projected=projected, mu_dtype=mu_dtype,
                     nu_dtype=nu_dtype,
                     quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)

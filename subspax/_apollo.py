"""Fira, APOLLO and APOLLO-Mini: the scaled-gradient family on the shared core.

* Fira is GaLore (exact SVD subspace, moments kept) plus recovery scaling of
  the residual with the norm-growth limiter.
* APOLLO keeps Adam moments of a Gaussian random projection ``R = P^T G`` only
  to estimate how Adam would rescale each channel, and applies that scale to
  the raw gradient: ``U = G diag(s)``, ``s_j = ||N_j|| / (||R_j|| + 1e-8)``
  (no back-projection), with the norm-growth limiter on the whole update.
  APOLLO-Mini is APOLLO at rank 1 with one tensor-wise scale and the paper's
  scale factor ``sqrt(128)``.

Both are :func:`~subspax.scale_by_subspace_adam` with a policy and options
(docs/algorithms.md sections 5.7 and 5.8); nothing here re-implements the
step.

Differences from the authors' code, on purpose (docs/algorithms.md section
10):

* eps is added to ``sqrt(nu_hat)`` (optax); the authors add it to
  ``sqrt(nu)`` before bias correction, i.e. their eps is ours times
  ``sqrt(1 - b2^t)``.
* ``limiter="corrected"`` (default) bounds the growth of the bias-corrected
  term, the one applied to the weights; ``limiter="uncorrected"`` is the
  authors' convention (limit ``mu / (sqrt(nu) + eps)``, then multiply by
  ``sqrt(1 - b2^t) / (1 - b1^t)``), for reproducing their runs.
* Fira's residual is the true ``G - S S^T G``; its code subtracts
  ``scale * S S^T G`` (the two agree at ``scale = 1``).
* APOLLO's ``scale`` multiplies the update; apollo-torch's ``scale`` argument
  is its square (it applies ``sqrt(scale)``): apollo-torch ``scale=128`` is
  ``scale=sqrt(128)`` here.

References:
  Chen et al., Fira, https://arxiv.org/abs/2410.01623;
  Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
"""

from __future__ import annotations

import math
from typing import Any, Optional

import optax

from subspax import _core
from subspax import _layout
from subspax import _methods
from subspax import _policies
from subspax import _types

# APOLLO-Mini's scale factor (apollo-torch's ``scale=128``, applied as a root).
APOLLO_MINI_SCALE = math.sqrt(128.0)


def scale_by_fira(
    rank: int = 128, update_interval: int = 200, *, scale: float = 0.25,
    recovery_limit: float = 1.01, limiter: _types.Limiter = "corrected",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """Fira: GaLore's SVD subspace plus norm-based recovery scaling.

  Every ``T`` steps the basis is the top-``r`` singular subspace of ``G``
  (moments kept, as GaLore). The update is ``scale * S N`` plus the residual
  ``G - S S^T G`` scaled per column by ``||N_j|| / ||R_j||``, whose norm may
  grow at most ``recovery_limit`` x per step.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_fira(rank=2, update_interval=10)
    >>> state = tx.init({'w': jnp.ones((8, 16))})
    >>> updates, state = tx.update({'w': jnp.ones((8, 16))}, state)

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between SVD refreshes ``T``.
    scale: Back-projection scale ``alpha`` (Fira's scripts: 0.25).
    recovery_limit: Norm-growth limiter ``zeta``.
    limiter: ``"corrected"`` (default: bounds the growth of the applied,
      bias-corrected recovery term), ``"uncorrected"`` (Fira's code: bounds
      it before bias correction) or ``"off"``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Chen et al., Fira, https://arxiv.org/abs/2410.01623
  """
  return _core.scale_by_subspace_adam(
      _policies.SvdSubspace(), rank, update_interval, b1=b1, b2=b2, eps=eps,
      scale=scale, moments="keep", recovery=True,
      recovery_limit=recovery_limit, limiter=limiter, side=side,
      projected=projected, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def scale_by_apollo(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    scale_type: _types.ScaleType = "channel", scale: float = 1.0,
    recovery_limit: float = 1.01, limiter: _types.Limiter = "corrected",
    store_basis: bool = False, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """APOLLO: the raw gradient scaled by Adam's ratio in a random subspace.

  The projection is Gaussian, ``N(0, 1/r)`` entries, regenerated from the key
  every step and redrawn every ``T`` steps (0 bytes of basis state unless
  ``store_basis``). Adam moments of ``R = P^T G`` (kept across redraws, as
  apollo-torch does) give ``N``; the update is
  ``scale * G diag(s)`` with ``s_j = ||N_j|| / (||R_j|| + 1e-8)`` per
  channel of the kept side (or one tensor-wise ratio), limited so that its
  norm grows at most ``recovery_limit`` x per step. State per matrix:
  ``2 r D`` numbers and one scalar.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_apollo(rank=2, update_interval=10)
    >>> state = tx.init({'w': jnp.ones((8, 16))})
    >>> updates, state = tx.update({'w': jnp.ones((8, 16))}, state)

  Args:
    rank: Rank ``r`` of the auxiliary random projection.
    update_interval: Steps between projection redraws ``T``.
    key: PRNG key or seed of the projections.
    scale_type: ``"channel"`` (one scale per kept column) or ``"tensor"``.
    scale: Multiplies the update (apollo-torch applies ``sqrt`` of its
      ``scale`` argument: its ``scale=s`` is ``scale=sqrt(s)`` here).
    recovery_limit: Norm-growth limiter ``zeta`` of the whole update.
    limiter: ``"corrected"`` (default), ``"uncorrected"`` (apollo-torch's
      convention) or ``"off"`` (apollo-torch's ``disable_nl``).
    store_basis: Store the projection instead of regenerating it.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
  """
  return _core.scale_by_subspace_adam(
      _policies.RandomSubspace(orthonormal=False), rank, update_interval,
      b1=b1, b2=b2, eps=eps, scale=scale, moments="keep", recovery=False,
      recovery_limit=recovery_limit, side=side, projected=projected,
      store_basis=store_basis, key=key, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype,
      output="scaled_gradient", scale_type=scale_type, limiter=limiter)


def scale_by_apollo_mini(
    rank: int = 1, update_interval: int = 200, *, key: _core.KeyLike = 0,
    scale: float = APOLLO_MINI_SCALE, recovery_limit: float = 1.01,
    limiter: _types.Limiter = "corrected", store_basis: bool = False,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """APOLLO-Mini: rank-1 APOLLO with one tensor-wise scale per matrix.

  SGD-like memory: ``2 D`` numbers and one scalar per projected matrix. The
  default ``scale`` is the paper's ``sqrt(128)``.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> tx = subspax.scale_by_apollo_mini()
    >>> state = tx.init({'w': jnp.ones((8, 16))})
    >>> updates, state = tx.update({'w': jnp.ones((8, 16))}, state)

  Args:
    rank: Rank of the auxiliary projection (the paper: 1).
    update_interval: Steps between projection redraws ``T``.
    key: PRNG key or seed of the projections.
    scale: Multiplies the update (apollo-torch's ``scale=128``).
    recovery_limit: Norm-growth limiter ``zeta`` of the whole update.
    limiter: ``"corrected"`` (default), ``"uncorrected"`` or ``"off"``.
    store_basis: Store the projection instead of regenerating it.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
  """
  return scale_by_apollo(
      rank, update_interval, key=key, scale_type="tensor", scale=scale,
      recovery_limit=recovery_limit, limiter=limiter, store_basis=store_basis,
      b1=b1, b2=b2, eps=eps, side=side, projected=projected,
      mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype)


def fira(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, scale: float = 0.25,
    recovery_limit: float = 1.01, limiter: _types.Limiter = "corrected",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """Fira with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_fira(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> tx = subspax.fira(learning_rate=1e-2, rank=4, update_interval=10)
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between SVD refreshes ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    scale: Back-projection scale ``alpha``.
    recovery_limit: Norm-growth limiter ``zeta``.
    limiter: ``"corrected"``, ``"uncorrected"`` (Fira's code) or ``"off"``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Chen et al., Fira, https://arxiv.org/abs/2410.01623
  """
  return _methods.with_learning_rate(
      scale_by_fira(rank, update_interval, scale=scale,
                    recovery_limit=recovery_limit, limiter=limiter, b1=b1,
                    b2=b2, eps=eps, side=side, projected=projected,
                    mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                    quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def apollo(
    learning_rate: optax.ScalarOrSchedule, rank: int = 128,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    scale_type: _types.ScaleType = "channel", scale: float = 1.0,
    recovery_limit: float = 1.01, limiter: _types.Limiter = "corrected",
    store_basis: bool = False, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: _types.Side = "auto",
    projected: _layout.Projected = None, mu_dtype: _types.MomentDType = None,
    nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """APOLLO with AdamW-style weight decay and a learning rate.

  ``optax.chain(scale_by_apollo(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> tx = subspax.apollo(learning_rate=1e-2, rank=4, update_interval=10)
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Rank ``r`` of the auxiliary random projection.
    update_interval: Steps between projection redraws ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or seed of the projections.
    scale_type: ``"channel"`` or ``"tensor"`` scaling.
    scale: Multiplies the update (``sqrt`` of apollo-torch's ``scale``).
    recovery_limit: Norm-growth limiter ``zeta`` of the whole update.
    limiter: ``"corrected"``, ``"uncorrected"`` (apollo-torch) or ``"off"``.
    store_basis: Store the projection instead of regenerating it.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
  """
  return _methods.with_learning_rate(
      scale_by_apollo(rank, update_interval, key=key, scale_type=scale_type,
                      scale=scale, recovery_limit=recovery_limit,
                      limiter=limiter, store_basis=store_basis, b1=b1, b2=b2,
                      eps=eps, side=side, projected=projected,
                      mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                      quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule, rank: int = 1,
    update_interval: int = 200, weight_decay: Any = 0.0,
    mask: Optional[Any] = None, *, key: _core.KeyLike = 0,
    scale: float = APOLLO_MINI_SCALE, recovery_limit: float = 1.01,
    limiter: _types.Limiter = "corrected", store_basis: bool = False,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    side: _types.Side = "auto", projected: _layout.Projected = None,
    mu_dtype: _types.MomentDType = None, nu_dtype: _types.MomentDType = None,
    quantize_moments: _types.QuantizeMoments = "off",
    basis_dtype: _types.MomentDType = None,
) -> optax.GradientTransformation:
  """APOLLO-Mini (rank 1, tensor-wise) with weight decay and a learning rate.

  ``optax.chain(scale_by_apollo_mini(...),
  optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> tx = subspax.apollo_mini(learning_rate=1e-2)
    >>> params = {'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Rank of the auxiliary projection (the paper: 1).
    update_interval: Steps between projection redraws ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    key: PRNG key or seed of the projections.
    scale: Multiplies the update (default ``sqrt(128)``, the paper's).
    recovery_limit: Norm-growth limiter ``zeta`` of the whole update.
    limiter: ``"corrected"``, ``"uncorrected"`` (apollo-torch) or ``"off"``.
    store_basis: Store the projection instead of regenerating it.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, added to ``sqrt(nu_hat)``.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
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
    Zhu et al., APOLLO, https://arxiv.org/abs/2412.05270
  """
  return _methods.with_learning_rate(
      scale_by_apollo_mini(rank, update_interval, key=key, scale=scale,
                           recovery_limit=recovery_limit, limiter=limiter,
                           store_basis=store_basis, b1=b1, b2=b2, eps=eps,
                           side=side, projected=projected, mu_dtype=mu_dtype,
                           nu_dtype=nu_dtype,
                           quantize_moments=quantize_moments,
      basis_dtype=basis_dtype),
      learning_rate, weight_decay, mask)

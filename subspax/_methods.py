"""The six methods: a subspace policy plus the papers' defaults.

Each method has two layers, as in optax: ``scale_by_<method>`` (the pure
rescaling, no learning rate) and ``<method>(learning_rate, ...)``, which chains
decoupled weight decay and the learning rate after it. Defaults follow
ALGORITHMS.md section 2.7.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import jax
import optax

from subspax import _core
from subspax import _layout
from subspax import _policies
from subspax import _validation

_DOC_COMMON = """
    b1, b2, eps: Adam's constants.
    side: ``"auto"`` (project the smaller dimension), ``"left"``, ``"right"``.
    projected: Which parameters to project (see ``scale_by_subspace_adam``).
    mu_dtype, nu_dtype: dtypes of the reduced moments (float32 by default)."""


def _with_learning_rate(transform: optax.GradientTransformation,
                        learning_rate: optax.ScalarOrSchedule,
                        weight_decay: Any, mask: Any
                        ) -> optax.GradientTransformation:
  """``chain(transform, add_decayed_weights, scale_by_learning_rate)``."""
  return optax.chain(transform,
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def _adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype):
  return dict(b1=b1, b2=b2, eps=eps, side=side, projected=projected,
              mu_dtype=mu_dtype, nu_dtype=nu_dtype)


def scale_by_galore(
    rank: int = 128, update_interval: int = 200, *, scale: float = 0.25,
    align_signs: bool = False, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """GaLore: top-``r`` singular subspace by exact SVD, moments kept.

  The baseline the other methods improve on; its refresh is a full SVD of
  every projected gradient.

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between SVD refreshes ``T``.
    scale: Back-projection scale ``alpha``.
    align_signs: Flip each new singular vector that points against the old
      one (``diag(S_new^T S_old) >= 0``), so a sign flip of the SVD does not
      negate rows of the kept first moment.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507
  """
  return _core.scale_by_subspace_adam(
      _policies.SvdSubspace(align_signs=align_signs), rank, update_interval, scale=scale,
      moments="keep", recovery=False,
      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))


def scale_by_subtrack(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    eta: Optional[float] = None, step: str = "optimal",
    init: str = "randomized",
    scale: float = 0.25, recovery: bool = True, recovery_limit: float = 1.01,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """SubTrack++: geodesic tracking of the gradient subspace.

  Every ``T`` steps the basis takes one Grassmannian geodesic step that lowers
  the projection error ``||G - S S^T G||_F`` (no SVD after the randomized
  initial one); the Adam moments are rotated into the new basis and the part
  of the gradient outside the subspace is added back with recovery scaling.

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between geodesic steps ``T``.
    key: PRNG key or seed (randomized initial range finder).
    eta: Geodesic step size (see ``step``); ``None``: 1 for ``"optimal"``
      (the best angle itself), the paper scripts' 10 for the other rules.
    step: ``"optimal"``: ``eta`` (a damping factor in ``[0, 1]``) times the
      angle that minimises the projection error along the geodesic (closed
      form; never increases it); ``"normalized"`` (angle
      ``eta sigma / ||G||_F^2``, capped at pi/4), ``"raw"`` (angle
      ``eta sigma``, the paper's rule) or ``"angle"`` (``eta`` radians).
    init: ``"randomized"`` range finder or exact ``"svd"`` for the first basis.
    scale: Back-projection scale ``alpha``.
    recovery: Recovery scaling of the residual (Fira).
    recovery_limit: Norm-growth limiter ``zeta``.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi, Nonta, Rambhatla, SubTrack++, https://arxiv.org/abs/2502.01586
  """
  _validation.choice("step", step, _policies.GEODESIC_STEPS)
  _validation.choice("init", init, _policies.INITS)
  if eta is None:
    eta = (_policies.OPTIMAL_DAMPING if step == "optimal"
           else _policies.PAPER_ETA)
  _validation.non_negative("eta", eta)
  if step == "optimal":
    _validation.in_range("eta", eta, 0.0, 1.0, closed_high=True)
  return _core.scale_by_subspace_adam(
      _policies.GeodesicSubspace(eta=eta, step=step, tangent="gradient",
                                 init=init),
      rank, update_interval, scale=scale, moments="rotate", recovery=recovery,
      recovery_limit=recovery_limit, key=key,
      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))


def scale_by_grasswalk(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    eta: float = 0.1, jump_prob: float = 0.0, init: str = "randomized",
    scale: float = 0.25, recovery: bool = True, recovery_limit: float = 1.01,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """GrassWalk: a random geodesic step on the Grassmannian every ``T`` steps.

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between random steps ``T``.
    key: PRNG key or seed.
    eta: Rotation angle per refresh, in radians.
    jump_prob: With this probability a refresh jumps to a fresh Haar-random
      subspace instead (the GrassWalk/GrassJump hybrid; 0 = pure walk).
    init: ``"randomized"`` range finder or exact ``"svd"`` first basis.
    scale: Back-projection scale ``alpha``.
    recovery: Recovery scaling of the residual.
    recovery_limit: Norm-growth limiter ``zeta``.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  _validation.choice("init", init, _policies.INITS)
  _validation.non_negative("eta", eta)
  _validation.in_range("jump_prob", jump_prob, 0.0, 1.0, closed_high=True)
  return _core.scale_by_subspace_adam(
      _policies.GeodesicSubspace(eta=eta, step="angle", tangent="random",
                                 init=init, jump_prob=jump_prob),
      rank, update_interval, scale=scale, moments="rotate", recovery=recovery,
      recovery_limit=recovery_limit, key=key,
      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))


def scale_by_grassjump(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    store_basis: bool = True, scale: float = 0.25, recovery: bool = True,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """GrassJump: a fresh Haar-random subspace every ``T`` steps.

  No SVD at all. With ``store_basis=False`` the basis is regenerated from the
  key every step (one thin QR) and costs 0 bytes of state.

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps between jumps ``T``.
    key: PRNG key or seed.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    recovery: Recovery scaling of the residual.
    recovery_limit: Norm-growth limiter ``zeta``.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Rajabi et al., Randomized Gradient Subspaces,
    https://arxiv.org/abs/2510.01878
  """
  return _core.scale_by_subspace_adam(
      _policies.RandomSubspace(orthonormal=True), rank, update_interval,
      scale=scale, moments="rotate", recovery=recovery,
      recovery_limit=recovery_limit, store_basis=store_basis, key=key,
      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))


def scale_by_rso(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    orthonormal: bool = True, store_basis: bool = True, scale: float = 1.0,
    prox: float = 0.0, prox_learning_rate: optax.ScalarOrSchedule = 1.0,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """RSO: Adam on a random subspace subproblem, restarted every ``T`` steps.

  As a gradient transformation: a random basis (Haar, or Gaussian
  ``N(0, 1/r)`` with ``orthonormal=False``), moments reset at every refresh,
  no recovery.

  Args:
    rank: Subspace rank ``r``.
    update_interval: Steps per subproblem ``T``.
    key: PRNG key or seed.
    orthonormal: Haar-random orthonormal basis, or a Gaussian one.
    store_basis: Store the basis, or regenerate it from the key.
    scale: Back-projection scale ``alpha``.
    prox: The proximal coefficient ``1 / eta_k`` of the subproblem
      ``f(W + S B) + ||B||_F^2 / (2 eta_k)``: adds ``prox * B`` to the reduced
      gradient, ``B`` the parameter's reduced displacement since the last
      refresh (extra ``r x D`` state). 0 (default) turns it off. The same
      value as the trainer's ``opt.prox`` gives the same steps.
    prox_learning_rate: The learning rate chained after this transformation,
      needed to know ``B`` (``subspax.rso`` passes its own). Weight decay is
      not part of ``B``.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Chen et al., RSO, https://arxiv.org/abs/2502.07222
  """
  return _core.scale_by_subspace_adam(
      _policies.RandomSubspace(orthonormal=orthonormal), rank, update_interval,
      scale=scale, moments="reset", recovery=False, store_basis=store_basis,
      prox=prox, prox_learning_rate=prox_learning_rate,
      key=key, **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype,
                              nu_dtype))


def scale_by_grass(
    rank: int = 128, update_interval: int = 200, *, key: _core.KeyLike = 0,
    selection: str = "multinomial", replacement: bool = False,
    keep_overlap: bool = False, scale: float = 1.0, recovery: bool = False,
    recovery_limit: float = 1.01, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, side: str = "auto",
    projected: _layout.Projected = None, mu_dtype=None, nu_dtype=None,
) -> optax.GradientTransformation:
  """GRASS: Adam on ``r`` selected rows of each gradient.

  The "basis" is ``r`` row indices and scales (``2 r`` numbers). Every ``T``
  steps rows are re-selected from the row norms and the moments are reset
  (or, with ``keep_overlap``, kept for rows selected both times).

  Args:
    rank: Number of rows ``r``.
    update_interval: Steps between selections ``T``.
    key: PRNG key or seed.
    selection: ``"topk"``, ``"multinomial"`` (norm-proportional) or
      ``"uniform"``.
    replacement: Sample with replacement (unbiased scales) or without.
    keep_overlap: Keep the moments of rows selected before and after.
    scale: Back-projection scale ``alpha``.
    recovery: Add the scaled unselected rows back (off in the paper).
    recovery_limit: Norm-growth limiter ``zeta``.
  """ + _DOC_COMMON + """

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Muhamed et al., GRASS, https://arxiv.org/abs/2406.17660
  """
  _validation.choice("selection", selection, _policies.SELECTIONS)
  return _core.scale_by_subspace_adam(
      _policies.RowSubspace(selection=selection, replacement=replacement),
      rank, update_interval, scale=scale,
      moments="overlap" if keep_overlap else "reset", recovery=recovery,
      recovery_limit=recovery_limit, key=key,
      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))


def _alias(scale_by, summary: str, *, passes_learning_rate: bool = False):
  """Builds ``method(learning_rate, rank, update_interval, weight_decay, mask,
  **kwargs)`` from ``scale_by_method`` (``passes_learning_rate``: also as its
  ``prox_learning_rate``)."""

  def method(learning_rate: optax.ScalarOrSchedule, rank: int = 128,
             update_interval: int = 200, weight_decay: Any = 0.0,
             mask: Optional[Any] = None, **kwargs
             ) -> optax.GradientTransformation:
    if passes_learning_rate:
      kwargs.setdefault("prox_learning_rate", learning_rate)
    return _with_learning_rate(scale_by(rank, update_interval, **kwargs),
                               learning_rate, weight_decay, mask)

  name = scale_by.__name__.removeprefix("scale_by_")
  method.__name__ = method.__qualname__ = name
  # Expose the keyword-only options of `scale_by` in the signature, so that
  # `inspect.signature` (and `optax.inject_hyperparams`) sees every argument.
  own = inspect.signature(method).parameters
  method.__signature__ = inspect.Signature(
      [p for p in own.values() if p.kind != p.VAR_KEYWORD] +
      [p for p in inspect.signature(scale_by).parameters.values()
       if p.kind == p.KEYWORD_ONLY])
  method.__doc__ = f"""{summary}

  ``optax.chain({scale_by.__name__}(rank, update_interval, **kwargs),
  optax.add_decayed_weights(weight_decay, mask),
  optax.scale_by_learning_rate(learning_rate))``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, subspax
    >>> tx = subspax.{name}(learning_rate=1e-2, rank=4, update_interval=10)
    >>> params = {{'w': jnp.ones((16, 32)), 'b': jnp.zeros((32,))}}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Subspace rank ``r``.
    update_interval: Steps between subspace refreshes ``T``.
    weight_decay: Decoupled weight decay, applied to all parameters (AdamW).
    mask: Which parameters get weight decay (as in ``optax.adamw``).
    **kwargs: Keyword arguments of ``subspax.{scale_by.__name__}``.

  Returns:
    An ``optax.GradientTransformation``.
  """
  return method


galore = _alias(scale_by_galore, "GaLore with AdamW-style weight decay.")
subtrack = _alias(scale_by_subtrack, "SubTrack++ with a learning rate.")
grasswalk = _alias(scale_by_grasswalk, "GrassWalk with a learning rate.")
grassjump = _alias(scale_by_grassjump, "GrassJump with a learning rate.")
rso = _alias(scale_by_rso, "RSO (random subspace optimization) with a "
             "learning rate.", passes_learning_rate=True)
grass = _alias(scale_by_grass, "GRASS (structured sparse rows) with a "
               "learning rate.")

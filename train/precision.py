"""Weight and moment precision: rounding of the parameter update, moment dtypes.

* `opt.stochastic_rounding` (None: on iff `model.param_dtype="bfloat16"` or
  `model.kernel_format="int8"`): the step adds the update in float32 and
  rounds it to bfloat16, and int8 kernels to their 8-bit levels, with
  `subspax.apply_updates(..., key=...)`. The key is derived from `seed` and
  the step counter only, so a resumed run rounds exactly as an uninterrupted
  one; scanned layers (`params['blocks']`) are stacked leaves, so a trainer
  that updates one layer at a time (`layer=l`) rounds as the whole step does.
* `model.kernel_format="int8"`: the blocks' kernels in int8 (train/model.py),
  re-quantized after each update; `validate_kernel_format` names what it
  needs (layer-wise updates of a scanned model).
* `opt.mu_dtype`, `opt.nu_dtype`: the dtypes of the Adam moments. subspax
  methods take them for their reduced moments; the moments optax keeps in the
  parameters' dtype (adamw's and optax_galore's `nu`, the Adam of the
  parameters a subspax method does not project) are kept in `opt.nu_dtype`
  by `subspax.with_moment_dtype`, so bfloat16 weights still get float32 moments.

Example:

  update = precision.updater(cfg)
  params = update(params, updates, state.step)  # in make_train_step
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import subspax

from train import errors
from train import model as model_lib

DTYPES = ("float32", "bfloat16")  # accepted opt.mu_dtype / opt.nu_dtype
BASIS_DTYPES = (*DTYPES, "int8")  # accepted opt.basis_dtype (int8: 8-bit blocks)
_ROUNDING_SALT = 0x5352  # separates the rounding keys from the other uses of `seed`

# (params, updates, step, *, layer=None) -> params
Updater = Callable[..., Any]


def stochastic_rounding(cfg: Any) -> bool:
  """Whether the run rounds its updates stochastically (`opt.stochastic_rounding`)."""
  flag = cfg.opt.get("stochastic_rounding")
  if flag is not None:
    return flag
  return (cfg.model.param_dtype == "bfloat16"
          or cfg.model.get("kernel_format", "float") == "int8")


def validate_kernel_format(cfg: Any) -> None:
  """Checks `model.kernel_format` against the rest of the config.

  int8 kernels are dequantized one layer at a time and updated where the
  layer-wise step (train/layerwise.py) updates that layer; the ordinary step
  would differentiate the int8 codes, and subspace layers keep float kernels.

  Raises:
    UserError: naming the field, its value and the fix.
  """
  fmt = cfg.model.get("kernel_format", "float")
  if fmt not in model_lib.KERNEL_FORMATS:
    raise errors.UserError(
        f"model.kernel_format must be one of {', '.join(model_lib.KERNEL_FORMATS)}, "
        f"got {fmt!r}; e.g. --config.model.kernel_format=int8")
  if fmt != "int8":
    return
  fix = "or set model.kernel_format=float"
  if not (cfg.opt.get("layerwise", False) and cfg.model.scan):
    raise errors.UserError(
        "model.kernel_format=int8 updates each layer's int8 kernels inside the "
        "backward scan and needs opt.layerwise=True and model.scan=True; set "
        f"--config.opt.layerwise=True --config.model.scan=True {fix}")
  if isinstance(cfg.get("grad_accum"), int) and cfg.grad_accum > 1:
    raise errors.UserError(
        "model.kernel_format=int8 is not implemented with micro-batch "
        f"accumulation (grad_accum={cfg.grad_accum}); set grad_accum=1 {fix}")
  if cfg.opt.get("subspace_layers", False):
    raise errors.UserError(
        "model.kernel_format=int8 does not combine with opt.subspace_layers=True "
        "(its frozen kernels are merged in float); set opt.subspace_layers=False "
        f"{fix}")


def validate(opt_cfg: Any, param_dtype: str, kernel_format: str = "float") -> None:
  """Checks `opt.stochastic_rounding` and `opt.{mu,nu,basis}_dtype`.

  Args:
    opt_cfg: The `opt` section.
    param_dtype: `model.param_dtype`.
    kernel_format: `model.kernel_format` (int8 kernels round too).

  Raises:
    UserError: naming the field, its value and the fix.
  """
  def check_rounding():
    flag = opt_cfg.get("stochastic_rounding")
    if flag is not None and not isinstance(flag, bool):
      raise errors.UserError(
          f"opt.stochastic_rounding must be True, False or None (on for bfloat16 "
          f"weights), got {flag!r}")
    if flag and param_dtype != "bfloat16" and kernel_format != "int8":
      raise errors.UserError(
          f"opt.stochastic_rounding=True rounds updates to bfloat16 weights, but "
          f"model.param_dtype={param_dtype!r}; set --config.model.param_dtype="
          "bfloat16 or drop opt.stochastic_rounding")

  def check_dtype(field, accepted=DTYPES):
    def check():
      value = opt_cfg.get(field, "float32")
      if value not in accepted:
        names = " or ".join(repr(a) for a in accepted)
        raise errors.UserError(
            f"opt.{field} must be {names}, got {value!r} "
            f"(e.g. --config.opt.{field}=bfloat16)")
    return check

  errors.gather(check_rounding, check_dtype("mu_dtype"), check_dtype("nu_dtype"),
                check_dtype("basis_dtype", BASIS_DTYPES))


def moment_dtypes(opt_cfg: Any) -> tuple[jnp.dtype, jnp.dtype]:
  """(mu dtype, nu dtype) of the `opt` section."""
  return (jnp.dtype(opt_cfg.get("mu_dtype", "float32")),
          jnp.dtype(opt_cfg.get("nu_dtype", "float32")))


def rounding_key(seed: int, step: jax.Array) -> jax.Array:
  """The rounding key of the update made at `step` (completed steps before it)."""
  base = jax.random.fold_in(jax.random.key(seed), _ROUNDING_SALT)
  return jax.random.fold_in(base, step)


def _is_block(path: tuple, leaf: Any) -> bool:
  """Scanned layers: everything under `params['blocks']` is stacked."""
  del leaf
  return bool(path) and path[0] == jax.tree_util.DictKey("blocks")


def updater(cfg: Any | None = None) -> Updater:
  """The trainer's `(params, updates, step, *, layer=None) -> params`.

  Args:
    cfg: The full config; None rounds to nearest (as `optax.apply_updates`,
      with the sum in float32).

  Returns:
    A function adding `updates` to `params`, with stochastic rounding keyed
    by (`cfg.seed`, `step`) when `stochastic_rounding(cfg)`. `layer=l`:
    the leaves under `params['blocks']` hold layer `l` only (scanned models).
  """
  rounding = cfg is not None and stochastic_rounding(cfg)
  stacked = _is_block if cfg is not None and cfg.model.scan else None

  def update(params, updates, step, *, layer=None):
    key = rounding_key(cfg.seed, step) if rounding else None
    return subspax.apply_updates(params, updates, key=key, stacked=stacked,
                                 layer=layer)

  return update


def basis_dtype(opt_cfg: Any) -> Any:
  """`opt.basis_dtype` as subspax takes it: a float dtype, or "int8"."""
  value = opt_cfg.get("basis_dtype", "float32")
  return value if value == "int8" else jnp.dtype(value)

"""Optimizer registry: a config's `opt` section -> an optax GradientTransformation.

Names (`NAMES`): `adamw` (optax; `opt.block_lr_scale` scales the step of
the kernels the subspax methods project, `adamw`), the nine subspax methods of
`subspax.METHODS` (`apollo_mini` is rank 1 by definition: it ignores
opt.rank), and `optax_galore` (optax.contrib.galore, the reference GaLore, as
a peer). Every optimizer gets the same learning-rate
schedule: linear warmup, then cosine decay to `opt.min_lr_ratio` x the peak.

A method's own options are the typed fields of `opt.<name>` (configs/base.py
generates them from `subspax.<name>`'s signature), e.g.
`--config.opt.subtrack.eta=5`; `validate` checks them, `build` passes them on.
"""

import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import subspax

from configs import base as config_base
from train import errors
from train import model as model_lib
from train import precision

# The trainer's optimizer names: AdamW, the subspax registry, optax's GaLore.
NAMES = ("adamw", *subspax.METHODS, "optax_galore")


def method_rank(name: str, rank: int) -> int:
  """The rank method `name` runs at: 1 for apollo_mini (rank 1 by definition).

  Example:
    method_rank("apollo_mini", 64)  # 1
  """
  return 1 if name == "apollo_mini" else rank


def warmup_steps(opt_cfg: Any, steps: int) -> int:
  """The warmup length of a run of `steps` steps.

  `opt.warmup_steps` if it is set (>= 0) and shorter than the run, else
  `opt.warmup_fraction` of the run, so that a run of any length works.

  Example:
    warmup_steps(cfg.opt, 8)  # 0 with the defaults (warmup_fraction 0.1)
  """
  if 0 <= opt_cfg.warmup_steps < steps:
    return opt_cfg.warmup_steps
  return int(opt_cfg.warmup_fraction * steps)


def warmup_note(opt_cfg: Any, steps: int) -> str | None:
  """A one-line note when an explicit opt.warmup_steps does not fit the run."""
  if opt_cfg.warmup_steps >= steps:
    return (f"note: opt.warmup_steps={opt_cfg.warmup_steps} is not shorter than "
            f"steps={steps}; warming up for {warmup_steps(opt_cfg, steps)} steps "
            f"instead (opt.warmup_fraction={opt_cfg.warmup_fraction} of the run)")
  return None


def schedule(opt_cfg: Any, steps: int) -> optax.Schedule:
  """Warmup from 0 to opt.learning_rate, then cosine to min_lr_ratio x peak."""
  peak = opt_cfg.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps(opt_cfg, steps),
      decay_steps=steps, end_value=peak * opt_cfg.min_lr_ratio)


def _decay_mask(opt_cfg: Any) -> Callable[[Any], Any] | None:
  """None (decay every parameter) or a mask restricted to matrices."""
  if not opt_cfg.decay_matrices_only:
    return None
  return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)


def scale_blocks(scale: float, blocks: Callable[[tuple, Any], bool]
                 ) -> optax.GradientTransformation:
  """Multiplies the updates of the parameters `blocks` selects by `scale`.

  Stateless; the others pass unchanged. Placed after a rescaling and before
  `optax.scale_by_learning_rate`, it gives those parameters `scale` x the
  learning rate, as a subspax method's `scale` does for its projected
  kernels (`adamw`).

  Examples:
    >>> import jax.numpy as jnp
    >>> tx = scale_blocks(0.25, lambda path, p: path[0].key == "w")
    >>> tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))[0]["w"]
    Array([0.25, 0.25], dtype=float32)

  Args:
    scale: The factor.
    blocks: `(path, leaf) -> bool` over the updates' key paths, e.g.
      `projected(opt_cfg)`.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  def update(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * scale if blocks(path, u) else u, updates)
  return optax.stateless(update)


def adamw(opt_cfg: Any, learning_rate: optax.ScalarOrSchedule, **adam: Any
          ) -> optax.GradientTransformation:
  """`optax.adamw`, with the projected kernels' step scaled by
  `opt.block_lr_scale`.

  A subspax method steps its projected kernels (the blocks' attention and
  MLP kernels, or those `opt.projected` names) at its `scale` x the learning
  rate and everything else (embedding, head, norms) at the learning rate.
  `opt.block_lr_scale` gives AdamW the same two groups: Adam's update of
  exactly those kernels (`projected(opt_cfg)` at `opt.rank`) is multiplied by
  the factor before the weight decay and the learning rate are applied, as
  in the subspax methods. At 1 (the default) this is `optax.adamw` itself.

  Example:
    tx = adamw(cfg.opt, schedule(cfg.opt, cfg.steps))  # what `build` gives

  Args:
    opt_cfg: The `opt` ConfigDict (`block_lr_scale`, `weight_decay`,
      `decay_matrices_only`, `projected`, `rank`).
    learning_rate: A float or a schedule.
    **adam: `b1`, `b2`, `eps`, `mu_dtype` of `optax.scale_by_adam`.

  Returns:
    The transformation: `optax.adamw(...)`, or with a factor other than 1,
    `optax.chain(scale_by_adam, scale_blocks, add_decayed_weights,
    scale_by_learning_rate)`.
  """
  scale = opt_cfg.get("block_lr_scale", 1.0)
  mask = _decay_mask(opt_cfg)
  if scale == 1:
    return optax.adamw(learning_rate, **adam,
                       weight_decay=opt_cfg.weight_decay, mask=mask)
  return optax.chain(
      optax.scale_by_adam(**adam),
      scale_blocks(scale, projected(opt_cfg)),
      optax.add_decayed_weights(opt_cfg.weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def is_projected(path: tuple, param: Any, rank: int) -> bool:
  """Whether the trainer projects a parameter by default: the attention and
  MLP kernels.

  As in the papers' code, only the blocks' weight matrices are projected
  (subspax's default rule on their shapes: rank below both sides, aspect
  ratio at most 8); the embedding and the LM head always get plain Adam, even
  where their shape would pass (LLaMA-7B's 32000 x 4096 does). A kernel whose
  smaller side is not above the rank (grouped-query k and v at a large rank)
  gets plain Adam too (`adam_kernels`). `opt.projected` replaces this rule
  (`projected`).

  Example:
    is_projected((jax.tree_util.DictKey("head"),), head_kernel, 64)  # False
  """
  return (bool(path) and getattr(path[0], "key", None) == "blocks"
          and subspax.default_is_projected(param.shape, rank))


def projected(opt_cfg: Any) -> Callable[[tuple, Any], bool]:
  """The `projected=` predicate of the subspax methods for `opt_cfg`.

  `is_projected` when `opt.projected` is empty, else the weight matrices
  (kernels, embedding) `subspax.projected_by_name(opt.projected)` selects
  (e.g. "attn,mlp", "attn.q,attn.v"): a scanned model's norm scales are
  (L, D) arrays, which a name such as "blocks" would otherwise take.

  Example:
    projected(cfg.opt)((DictKey("head"), DictKey("kernel")), head_kernel)  # False

  Args:
    opt_cfg: The `opt` ConfigDict (`opt.projected`, `opt.name`, `opt.rank`).

  Returns:
    `(path, param) -> bool`, the `projected=` of `subspax.<opt.name>`.
  """
  if opt_cfg.get("projected"):
    by_name = subspax.projected_by_name(opt_cfg.projected)
    return lambda path, p: _is_weight(path) and by_name(path, p)
  rank = method_rank(opt_cfg.name, opt_cfg.rank)
  return lambda path, p: is_projected(path, p, rank)


def _is_weight(path: tuple) -> bool:
  """Whether a parameter is a weight matrix (a kernel or an embedding), not a
  norm scale, which a scanned model stacks into an (L, D) array too."""
  return bool(path) and getattr(path[-1], "key", None) in ("kernel", "embedding")


def overwrites_gradient(tx: optax.GradientTransformation, params: Any
                        ) -> Callable[[tuple, Any], bool]:
  """Which gradients `tx` overwrites in place, as a `(path, leaf) -> bool`.

  The transformation knows (`subspax.overwritten`): a subspax method writes
  a projected parameter's update into that parameter's gradient buffer;
  AdamW and optax.contrib.galore only read their gradients. The train step
  orders its gradient-norm metric before these writes
  (`train.make_train_step`), and the clip scales them in place
  (`with_clipping`).

  Args:
    tx: The optimizer, before clipping.
    params: The parameters it updates (arrays or shapes).

  Returns:
    A predicate over a gradient's key path (and the leaf, unused).
  """
  flags = jax.tree_util.tree_flatten_with_path(subspax.overwritten(tx, params))[0]
  paths = {jax.tree_util.keystr(path) for path, flag in flags if flag}
  return lambda path, leaf: jax.tree_util.keystr(path) in paths


def _galore_dims(opt_cfg: Any) -> Callable[[Any], Any]:
  """optax.contrib.galore routing equal to the subspax methods' (`projected`)."""
  rule = projected(opt_cfg)
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: (optax.contrib.GaLoreDimensionNumbers()
                       if p.ndim == 2 and rule(path, p) else None),
      params)


def method_kwargs(opt_cfg: Any, name: str | None = None) -> dict[str, Any]:
  """The options of method `name` (default opt.name) from section `opt.<name>`.

  Example:
    method_kwargs(cfg.opt, "grass")["selection"]  # 'multinomial' by default

  Returns:
    option -> value for every option of the method (a field missing from the
    section gives the method's default); {} for adamw.
  """
  name = opt_cfg.name if name is None else name
  section = opt_cfg.get(name) or {}
  return {key: section.get(key, option.default)
          for key, option in config_base.options(name).items()}


def _check_options(opt_cfg: Any) -> None:
  """Rejects an unknown field, a wrong type or a choice not accepted in
  `opt.<opt.name>` (the sections of other methods are not read)."""
  name = opt_cfg.name
  if name not in NAMES:
    return  # _check_name reports it
  section, options = opt_cfg.get(name) or {}, config_base.options(name)
  unknown = sorted(set(section) - set(options))
  if unknown:
    raise errors.UserError(
        f"opt.{name}.{unknown[0]} is not an option of opt.name={name!r}; its "
        f"options are {', '.join(options) or 'none'}")
  for key, option in options.items():
    _check_value(f"opt.{name}.{key}", option, section.get(key, option.default))


def _check_value(field: str, option: config_base.Option, value: Any) -> None:
  """One option's value: its type (an int is a float too) and its choices."""
  kind = option.field_type
  typed = (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
           or kind is float and isinstance(value, int) and not isinstance(value, bool)
           or value is None and option.default is None)
  if not typed:
    raise errors.UserError(
        f"{field}={value!r} must be a {kind.__name__}, e.g. "
        f"--config.{field}={option.default!r}")
  if option.choices and value not in option.choices:
    raise errors.UserError(
        f"{field}={value!r} is not one of {', '.join(map(str, option.choices))}")


def validate(opt_cfg: Any, model_cfg: model_lib.LlamaConfig, steps: int,
             seed: int = 0) -> optax.GradientTransformation:
  """Rejects a bad `opt` section before anything is computed, and builds it.

  The method's own checks of its options run in its factory, so the last
  check is `build` itself: its result is returned for the run to use, which
  then builds nothing again (`train.check_and_mesh`, `train.build_programs`).

  Example:
    tx = validate(cfg.opt, model_cfg, cfg.steps, cfg.seed)  # == build(...)

  Args:
    opt_cfg: The `opt` ConfigDict.
    model_cfg: The model (its kernels' shapes; the vocabulary is not read).
    steps: Total training steps (the schedule's horizon).
    seed: Seed for the subspace optimizers' random bases.

  Returns:
    `build(opt_cfg, steps, seed)`.

  Raises:
    UserError: unknown name, a learning rate or schedule field out of range,
      a rank that projects no kernel (or, with `opt.projected` or
      `opt.subspace_layers`, one not below a projected kernel's smaller side;
      the default rule leaves narrower kernels to Adam: `rank_note`), or an option in
      `opt.<name>` that is unknown, of the wrong type, not one of its choices
      or not accepted by the method; a bad `opt.stochastic_rounding`,
      `opt.mu_dtype` or `opt.nu_dtype` (train/precision.py).
  """
  errors.gather(lambda: _check_name(opt_cfg), lambda: _check_schedule(opt_cfg),
                lambda: _check_block_lr_scale(opt_cfg),
                lambda: _check_options(opt_cfg),
                lambda: _check_projected(opt_cfg, model_cfg),
                lambda: precision.validate(opt_cfg, model_cfg.param_dtype,
                                           model_cfg.kernel_format))
  if opt_cfg.name != "adamw":
    _check_rank(opt_cfg, model_cfg)
  if opt_cfg.name == "optax_galore" and model_cfg.scan:
    raise errors.UserError(
        "opt.name='optax_galore' cannot project scanned (L, in, out) kernels per "
        "layer; set model.scan=False or use opt.name='galore'")
  try:
    return build(opt_cfg, steps, seed)
  except (TypeError, ValueError) as e:  # the method's own checks of its options
    raise errors.UserError(f"opt.{opt_cfg.name}: {e}") from e


def _routes_by_rank(opt_cfg: Any) -> bool:
  """Whether the default rule routes the blocks' kernels (`is_projected`):
  not with `opt.projected` (the user's choice) or `opt.subspace_layers`
  (every kernel is a subspace layer)."""
  return not (opt_cfg.get("projected") or opt_cfg.get("subspace_layers"))


def _check_rank(opt_cfg: Any, model_cfg: model_lib.LlamaConfig) -> None:
  """Rejects a rank that projects nothing (default rule) or that is not below
  a kernel that `opt.projected` or `opt.subspace_layers` projects."""
  dims = _projected_dims(opt_cfg, model_cfg)
  by_rank = _routes_by_rank(opt_cfg)
  # The default rule leaves a kernel whose smaller side is not above the rank
  # to plain Adam (`rank_note`); it must project one kernel at least.
  pick = max if by_rank else min
  where, (d_in, d_out) = pick(dims.items(), key=lambda kv: min(kv[1]))
  if 0 < opt_cfg.rank < min(d_in, d_out):
    return
  if by_rank:
    raise errors.UserError(
        f"opt.rank={opt_cfg.rank} must be positive and smaller than the smaller "
        f"side of one of the blocks' kernels at least, the largest being "
        f"{min(d_in, d_out)} ({where} kernel is ({d_in}, {d_out})); lower opt.rank "
        "or widen the model")
  fix = ("leave it out of opt.projected" if opt_cfg.get("projected")
         else "set opt.subspace_layers=False")
  raise errors.UserError(
      f"opt.rank={opt_cfg.rank} must be positive and smaller than the model's "
      f"smallest projected dimension {min(d_in, d_out)} ({where} kernel is "
      f"({d_in}, {d_out})); lower opt.rank, widen the model or {fix}")


def adam_kernels(opt_cfg: Any, model_cfg: model_lib.LlamaConfig
                 ) -> dict[str, tuple[int, int]]:
  """The blocks' kernels the default rule leaves to plain Adam for the rank.

  A rank chosen for the large matrices can be no smaller than the smaller
  side of a narrow kernel: grouped-query attention's k and v kernels are
  (D, K x H), e.g. LLaMA-2-70B's 8192 x 1024 at rank 1024. `is_projected`
  gives such a kernel plain Adam (a projection would save nothing) and
  projects the others at the rank; `rank_note` says so.

  Example:
    adam_kernels(cfg.opt, model_cfg)  # {'attn.k': (8192, 1024), 'attn.v': ...}

  Args:
    opt_cfg: The `opt` ConfigDict.
    model_cfg: The model.

  Returns:
    kernel name -> (in, out) of each such kernel; {} for adamw, with
    `opt.projected` or `opt.subspace_layers` (which `validate` checks instead).
  """
  if opt_cfg.name == "adamw" or not _routes_by_rank(opt_cfg):
    return {}
  rank = method_rank(opt_cfg.name, opt_cfg.rank)
  return {name: dims for name, dims in model_cfg.projected_dims().items()
          if rank >= min(dims)}


def rank_note(opt_cfg: Any, model_cfg: model_lib.LlamaConfig) -> str | None:
  """A one-line note naming the kernels `adam_kernels` leaves to plain Adam."""
  left = adam_kernels(opt_cfg, model_cfg)
  if not left:
    return None
  rank = method_rank(opt_cfg.name, opt_cfg.rank)
  names = ", ".join(f"{name} ({d_in} x {d_out})" for name, (d_in, d_out) in left.items())
  below = min(min(dims) for dims in left.values())
  return (f"note: opt.rank={rank} is not smaller than the smaller side of {names}: "
          f"they get plain Adam, the other kernels a rank-{rank} subspace (an "
          f"opt.rank below {below} projects them too)")


def _check_projected(opt_cfg: Any, model_cfg: model_lib.LlamaConfig) -> None:
  """Rejects an `opt.projected` that is not a pattern list or selects nothing."""
  names = opt_cfg.get("projected", "")
  if not isinstance(names, str):
    raise errors.UserError(
        f"opt.projected must be a string of comma-separated names, got {names!r}; "
        'e.g. --config.opt.projected=attn,mlp ("" projects the blocks\' kernels)')
  if not names:
    return
  try:
    rule = subspax.projected_by_name(names)
  except ValueError as e:
    raise errors.UserError(f"opt.projected={names!r}: {e}") from None
  if opt_cfg.name == "adamw" and opt_cfg.get("block_lr_scale", 1.0) == 1:
    return  # AdamW projects nothing; opt.block_lr_scale scales what it selects
  if opt_cfg.get("subspace_layers"):
    raise errors.UserError(
        f"opt.projected={names!r} cannot be combined with opt.subspace_layers=True "
        "(its subspace layers are the blocks' kernels); set opt.projected=\"\"")
  leaves = _named_params(model_cfg)
  if not any(rule(path, p) for path, p in leaves):
    known = sorted({re.sub(r"\.\d+\.", ".", subspax.path_name(path))
                    for path, p in leaves if _is_weight(path)})
    raise errors.UserError(
        f"opt.projected={names!r} selects no matrix of the model; its matrices are "
        f"{', '.join(known)} (a name matches whole words, e.g. attn, mlp.up)")


def _named_params(model_cfg: model_lib.LlamaConfig) -> list[tuple[tuple, Any]]:
  """(path, ShapeDtypeStruct) of every parameter of the model."""
  shapes = model_lib.abstract_model(model_cfg)[1]
  return jax.tree_util.tree_flatten_with_path(shapes)[0]


def _projected_dims(opt_cfg: Any, model_cfg: model_lib.LlamaConfig
                    ) -> dict[str, tuple[int, int]]:
  """(in, out) of the per-layer kernels the optimizer projects, by name.

  The blocks' kernels only: an embedding or head selected by `opt.projected`
  has a vocabulary side not known before the tokenizer loads.
  """
  if not opt_cfg.get("projected"):
    return model_cfg.projected_dims()
  rule = projected(opt_cfg)
  short = lambda path: re.sub(r"^blocks\.(\d+\.)?|\.kernel$", "",
                             subspax.path_name(path))
  dims = {short(path): p.shape[-2:]
          for path, p in _named_params(model_cfg)
          if getattr(path[0], "key", None) == "blocks" and rule(path, p)}
  return dims or model_cfg.projected_dims()


def _check_name(opt_cfg: Any) -> None:
  if opt_cfg.name not in NAMES:
    raise errors.UserError(
        f"unknown optimizer opt.name={opt_cfg.name!r}; choose one of {', '.join(NAMES)}")


def _check_block_lr_scale(opt_cfg: Any) -> None:
  """Rejects an `opt.block_lr_scale` that is not a positive number, or that
  is set for an optimizer other than adamw (a subspax method has its own
  `scale`)."""
  scale = opt_cfg.get("block_lr_scale", 1.0)
  if (isinstance(scale, bool) or not isinstance(scale, (int, float))
      or not 0 < scale < float("inf")):
    raise errors.UserError(
        f"opt.block_lr_scale must be a positive number, got {scale!r}; e.g. "
        "--config.opt.block_lr_scale=0.25 (1: the same rate for every parameter)")
  if scale != 1 and opt_cfg.name != "adamw":
    own = (f"opt.{opt_cfg.name}.scale" if "scale" in config_base.options(opt_cfg.name)
           else "its own rule")
    raise errors.UserError(
        f"opt.block_lr_scale={scale!r} applies to opt.name='adamw' only; "
        f"opt.name={opt_cfg.name!r} scales its projected kernels by {own} "
        "(set opt.block_lr_scale=1)")


def _check_schedule(opt_cfg: Any) -> None:
  """Rejects a learning-rate schedule that cannot train."""
  if not opt_cfg.learning_rate > 0:
    raise errors.UserError(
        f"opt.learning_rate must be positive, got {opt_cfg.learning_rate!r}; a "
        "zero or negative rate does not descend (e.g. --config.opt.learning_rate=3e-3)")
  if not 0 <= opt_cfg.warmup_fraction < 1:
    raise errors.UserError(
        f"opt.warmup_fraction must be in [0, 1), got {opt_cfg.warmup_fraction!r}")
  if opt_cfg.warmup_steps < -1:
    raise errors.UserError(f"opt.warmup_steps must be >= 0 (or -1: use "
                           f"opt.warmup_fraction), got {opt_cfg.warmup_steps!r}")
  if not 0 <= opt_cfg.min_lr_ratio <= 1:
    raise errors.UserError(
        f"opt.min_lr_ratio must be in [0, 1], got {opt_cfg.min_lr_ratio!r}")


def with_clipping(opt_cfg: Any, tx: optax.GradientTransformation,
                  in_place: Callable[[tuple, Any], bool] | None = None
                  ) -> optax.GradientTransformation:
  """`tx` after clipping the gradient to global norm `opt.clip_norm` (if > 0).

  Example:
    tx = with_clipping(cfg.opt, build(cfg.opt, cfg.steps, cfg.seed),
                       overwrites_gradient(tx, params))

  Args:
    opt_cfg: The `opt` ConfigDict.
    tx: The optimizer.
    in_place: The gradients `tx` overwrites in place (`overwrites_gradient`);
      see `subspax.clip_by_global_norm`.

  Returns:
    `tx`, or `subspax.clip_by_global_norm(opt_cfg.clip_norm, in_place)`
    chained before it.
  """
  if not opt_cfg.clip_norm:
    return tx
  return optax.chain(subspax.clip_by_global_norm(opt_cfg.clip_norm, in_place), tx)


def build(opt_cfg: Any, steps: int, seed: int) -> optax.GradientTransformation:
  """Builds the optimizer named by opt_cfg.name (`validate` checks and builds).

  Args:
    opt_cfg: The `opt` ConfigDict.
    steps: Total training steps (the schedule's horizon).
    seed: Seed for the subspace optimizers' random bases.

  Returns:
    The gradient transformation; its learning rate is `schedule(opt_cfg, steps)`.
  """
  lr = schedule(opt_cfg, steps)
  mask = _decay_mask(opt_cfg)
  kwargs = method_kwargs(opt_cfg)
  mu_dtype, nu_dtype = precision.moment_dtypes(opt_cfg)
  adam = dict(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, mu_dtype=mu_dtype)
  if opt_cfg.name == "adamw":
    tx = adamw(opt_cfg, lr, **adam)
  elif opt_cfg.name == "optax_galore":  # its projector keeps the params' dtype
    return optax.contrib.galore(
        lr, rank=opt_cfg.rank, update_proj_gap=opt_cfg.update_interval,
        base_optimizer=subspax.with_moment_dtype(
            optax.scale_by_adam(**adam), nu_dtype),
        weight_decay=opt_cfg.weight_decay, mask=mask,
        weight_dimension_numbers=_galore_dims(opt_cfg), **kwargs)
  else:
    factory = subspax.METHODS[opt_cfg.name]
    if "key" in inspect.signature(factory).parameters:
      kwargs["key"] = seed
    rank = method_rank(opt_cfg.name, opt_cfg.rank)
    kwargs["projected"] = projected(opt_cfg)
    kwargs["basis_dtype"] = precision.basis_dtype(opt_cfg)
    tx = factory(lr, rank=rank, update_interval=opt_cfg.update_interval,
                 weight_decay=opt_cfg.weight_decay, mask=mask, nu_dtype=nu_dtype,
                 **adam, **kwargs)
  # optax keeps nu (and subspax the nu of what it does not project) in the
  # parameters' dtype: opt.nu_dtype instead.
  return subspax.with_moment_dtype(tx, nu_dtype)

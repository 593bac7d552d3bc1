"""The training loop: validate, build, compile once, train, evaluate, checkpoint.

`run(cfg, workdir)` trains the LLaMA of `cfg.model` with the optimizer named
by `cfg.opt.name` on `cfg.data`, resuming from the latest checkpoint in
`workdir` if there is one (bit-exactly: same params, optimizer state and data
position).
"""

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import subspax
from flax import nnx

from train import attention
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import errors
from train import hf
from train import layerwise
from train import metrics as metrics_lib
from train import memory as memory_lib
from train import model as model_lib
from train import optimizers
from train import precision
from train import preemption
from train import reparam
from train import resume
from train import sharding as sharding_lib
from train import tokenizer as tokenizer_lib


class TrainState(NamedTuple):
  """Everything a step reads and writes; checkpointed as one item."""

  step: jax.Array  # shape=(), int32: completed optimizer steps
  params: dict  # nested dict of arrays, float32 by default (model.param_dtype)
  opt_state: optax.OptState  # the optimizer's state for the trainable params


def validate(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Checks the config's fields and its `opt` section, all in one pass.

  The last check of the `opt` section builds the optimizer
  (`optimizers.validate`); pass it on to `build_programs`, which then builds
  none.

  Example:
    tx = validate(cfg)
    programs = build_programs(cfg, vocab_size, tx)

  Returns:
    `optimizers.build(cfg.opt, cfg.steps, cfg.seed)`.

  Raises:
    UserError: naming each bad field, its value and the fix ("; "-separated
      when several are wrong).
  """
  def at_least(key, low, what):
    def check():
      if not isinstance(cfg[key], int) or cfg[key] < low:
        raise errors.UserError(f"{key} must be a {what} int, got {cfg[key]!r}")
    return check

  def dtype(key):
    def check():
      if cfg.model[key] not in ("float32", "bfloat16"):
        raise errors.UserError(
            f"model.{key} must be 'float32' or 'bfloat16', got {cfg.model[key]!r}")
    return check

  steps_ok = isinstance(cfg.steps, int) and cfg.steps >= 1
  *_, tx = errors.gather(
      *(at_least(key, 1, "positive") for key in (
          "steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
          "keep_checkpoints", "grad_accum")),
      *(at_least(key, 0, "non-negative") for key in (
          "eval_every", "eval_batches", "stop_after")),
      dtype("dtype"), dtype("param_dtype"), lambda: _check_attention(cfg.model),
      lambda: reparam.validate(cfg.opt),
      lambda: layerwise.validate(cfg),
      lambda: precision.validate_kernel_format(cfg),
      lambda: _check_grad_accum(cfg), lambda: _check_clip_norm(cfg.opt),
      lambda: optimizers.validate(
          cfg.opt, model_lib.LlamaConfig.from_config(cfg.model, 1),
          cfg.steps if steps_ok else 1, cfg.seed))
  return tx


def _check_attention(model_cfg: ml_collections.ConfigDict) -> None:
  if model_cfg.attention not in attention.KINDS:
    raise errors.UserError(
        f"model.attention must be one of {', '.join(attention.KINDS)}, got "
        f"{model_cfg.attention!r}; e.g. --config.model.attention=blockwise")
  block = model_cfg.attention_block
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise errors.UserError(
        f"model.attention_block must be a positive int, got {block!r}; e.g. "
        "--config.model.attention_block=512")


def _check_grad_accum(cfg: ml_collections.ConfigDict) -> None:
  if isinstance(cfg.grad_accum, int) and cfg.grad_accum > 1 and (
      cfg.batch_size % cfg.grad_accum):
    raise errors.UserError(
        f"batch_size={cfg.batch_size} must be a multiple of grad_accum="
        f"{cfg.grad_accum} (each step averages grad_accum equal micro-batches)")


def _check_clip_norm(opt_cfg: ml_collections.ConfigDict) -> None:
  if not isinstance(opt_cfg.clip_norm, (int, float)) or opt_cfg.clip_norm < 0:
    raise errors.UserError(
        f"opt.clip_norm must be >= 0 (0 turns clipping off), got {opt_cfg.clip_norm!r}")


class Checked(NamedTuple):
  """What `check_and_mesh` makes of a config before any data is read."""

  mesh: jax.sharding.Mesh
  rules: dict[str, tuple[str, ...]]  # logical axis -> mesh axes
  tx: optax.GradientTransformation  # the optimizer validation built


def check_and_mesh(cfg: ml_collections.ConfigDict,
                   devices: Sequence[jax.Device] | None = None) -> Checked:
  """Validates a config (all but its data) and builds its mesh.

  Prints `optimizers.rank_note` when the rank leaves kernels to plain Adam.
  The one validation of a run (`train.run`, `--dry_run`, the benchmarks):
  pass its `tx` to `build_programs`, so the optimizer is built once.

  Example:
    checked = check_and_mesh(cfg)
    programs = build_programs(cfg, vocab_size, checked.tx)

  Args:
    cfg: The full config.
    devices: The devices to lay the mesh over (`sharding.make_mesh`).

  Returns:
    The mesh, the parsed logical-axis rules (`sharding.parse_rules`) and the
    optimizer (`validate`).

  Raises:
    ValueError: naming the field, its value and the fix.
  """
  tx = validate(cfg)  # the opt section too (reparam.validate, optimizers.validate)
  note = optimizers.rank_note(
      cfg.opt, model_lib.LlamaConfig.from_config(cfg.model, 1))
  if note:
    print(note, flush=True)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  rules = sharding_lib.parse_rules(cfg.mesh.rules)
  sharding_lib.check_batch(cfg.batch_size, mesh)
  return Checked(mesh, rules, tx)


def loss_fn(params: dict, graphdef: nnx.GraphDef, batch_BxL1: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of a (B, L+1) token batch."""
  logits_BxLxV = model_lib.apply(graphdef, params, batch_BxL1[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, batch_BxL1[:, 1:]).mean()


def _loss_and_grads(graphdef: nnx.GraphDef, trainable: dict, frozen: dict,
                    batch_BxL1: jax.Array, micro_batches: int):
  """The loss and its gradient, averaged over `micro_batches` equal parts of
  the batch (computed one after the other, their gradients summed)."""
  value_and_grad = jax.value_and_grad(
      lambda p, b: loss_fn(model_lib.combine(p, frozen), graphdef, b))
  if micro_batches == 1:
    return value_and_grad(trainable, batch_BxL1)
  b, length = batch_BxL1.shape
  # Part j takes rows j, j + k, j + 2k, ...: each device's rows stay local.
  parts = batch_BxL1.reshape(b // micro_batches, micro_batches, length).swapaxes(0, 1)

  def add(carry, part):
    loss, grads = value_and_grad(trainable, part)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), trainable))
  (loss, grads), _ = jax.lax.scan(add, zeros, parts)
  return jax.tree.map(lambda x: x / micro_batches, (loss, grads))


def _after_norm(grads: dict, norm: jax.Array,
                overwritten: Callable[[tuple, jax.Array], bool]) -> dict:
  """`grads`, unchanged, where the `overwritten` leaves can only be used once
  `norm` exists (`subspax.ordering.run_after`).

  The subspax methods write a projected parameter's update into its gradient
  buffer in place. Unless the norm is ordered first, XLA keeps a copy of every
  such gradient for it (at LLaMA-7B, 3.8 GiB of temporaries). (The train
  step's `jax.lax.optimization_barrier` alone leaves these copies in place:
  XLA's CPU pipeline expands it away.) The other leaves stay free, so that an
  update that only reads its gradient (AdamW's) is not held back.
  """
  def after(path, g):
    if not g.size or not overwritten(path, g):
      return g
    return subspax.ordering.run_after(g, norm, norm)
  return jax.tree_util.tree_map_with_path(after, grads)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr: optax.Schedule, micro_batches: int = 1,
                    update_params: precision.Updater | None = None,
                    overwritten: Callable[[tuple, jax.Array], bool] | None = None,
                    refresh: bool | None = None) -> Callable:
  """The (state, batch) -> (state, metrics) function that jit compiles.

  Only the `model.TRAINABLE` parameters (all of them, unless the model has
  reparametrised layers, whose kernels and bases stay frozen) are
  differentiated and updated, by `update_params` (`precision.updater`:
  float32 sum, stochastic rounding to bfloat16 weights; default: round to
  nearest). `micro_batches` > 1 (`grad_accum`) averages the gradients of that
  many parts of the batch before the one update. `overwritten(path, grad)`:
  the gradients `tx` may overwrite in place (`optimizers.overwrites_gradient`),
  which the gradient-norm metric must read first. `refresh`: passed to a
  subspax method's update (True: a refresh step; False: an ordinary step, with
  no conditional; None, the default: decided inside the program).
  """
  update_params = update_params or precision.updater()
  extra = {} if refresh is None else {"refresh": refresh}
  overwritten = overwritten or (lambda path, g: False)

  def train_step(state: TrainState, batch_BxL1: jax.Array):
    trainable, frozen = model_lib.partition(
        graphdef, state.params, model_lib.TRAINABLE, ...)
    loss, grads = _loss_and_grads(graphdef, trainable, frozen, batch_BxL1,
                                  micro_batches)
    # The norm reads the gradients before the optimizer overwrites any of them
    # (the barrier keeps AdamW's schedule; _after_norm removes the subspax
    # methods' copies).
    grads, grad_norm = jax.lax.optimization_barrier((grads, optax.tree.norm(grads)))
    grads = _after_norm(grads, grad_norm, overwritten)
    updates, opt_state = tx.update(grads, state.opt_state, trainable, **extra)
    params = model_lib.combine(update_params(trainable, updates, state.step), frozen)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "lr": lr(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def evaluate(eval_step: Callable, params: dict, batches: Iterator[np.ndarray],
             n_batches: int, to_global: Callable) -> dict[str, float]:
  """Mean loss and perplexity over the first `n_batches` held-out batches."""
  losses = [eval_step(params, to_global(b)) for b, _ in zip(batches, range(n_batches))]
  if not losses:
    return {}
  loss = float(np.mean(jax.device_get(losses)))
  return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


class Programs(NamedTuple):
  """What a config trains: the model, the optimizer and the step functions."""

  model_cfg: model_lib.LlamaConfig
  graphdef: nnx.GraphDef
  param_shapes: dict  # jax.ShapeDtypeStruct per parameter (model.abstract_model)
  param_names: dict  # logical-axis PartitionSpec per parameter
  tx: optax.GradientTransformation  # acts on model.trainable(graphdef, params)
  lr: optax.Schedule
  init: Callable[[], TrainState]  # the initial state (jit it)
  train_step: Callable  # (state, batch) -> (state, metrics), any step (a subspax
      # method decides inside whether it refreshes)
  refresh: Callable | None  # reparam modes: (state, batch) -> state, run before
                            # every step whose `state.step % update_interval == 0`
  ordinary_step: Callable | None  # subspax methods: `train_step` for the steps
      # that do not refresh, compiled with no refresh and no conditional
  refresh_step: Callable | None  # subspax methods: `train_step` for the steps
      # that refresh (`is_refresh_step`); the trainer runs these two


def build_programs(cfg: ml_collections.ConfigDict, vocab_size: int,
                   tx: optax.GradientTransformation | None = None) -> Programs:
  """Builds the model, optimizer and step functions of a validated config.

  Args:
    cfg: A full config (configs/base.py).
    vocab_size: The tokenizer's vocabulary size.
    tx: The optimizer `validate` (or `check_and_mesh`) built for `cfg`; None
      builds it here (`optimizers.build`). The subspace-layer modes build
      their own (`reparam.build_tx`) and ignore it.

  Returns:
    The un-jitted programs; `run` places and compiles them on the mesh.
  """
  model_cfg = model_lib.LlamaConfig.from_config(
      cfg.model, vocab_size, **reparam.model_fields(cfg.opt))
  graphdef, param_shapes, param_names = model_lib.abstract_model(model_cfg)
  if model_cfg.reparam:
    tx = reparam.build_tx(cfg.opt, cfg.steps,
                          reparam.delta_labels(graphdef, param_shapes))
    overwritten = None  # the deltas' plain Adam only reads its gradients
  else:
    if tx is None:
      tx = optimizers.build(cfg.opt, cfg.steps, cfg.seed)
    overwritten = optimizers.overwrites_gradient(tx, model_lib.as_float(
        model_lib.trainable(graphdef, param_shapes), model_cfg.param_dtype))
  tx = optimizers.with_clipping(cfg.opt, tx, overwritten)
  lr = optimizers.schedule(cfg.opt, cfg.steps)

  def init() -> TrainState:
    params = model_lib.init_params(model_cfg, cfg.seed)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(model_lib.as_float(
        model_lib.trainable(graphdef, params), model_cfg.param_dtype)))

  refresh = None
  if model_cfg.reparam:
    plain_graphdef, plain_shapes, _ = model_lib.abstract_model(
        dataclasses.replace(model_cfg, reparam=""))
    if cfg.opt.layerwise and model_cfg.reparam == "rows":
      refresh = layerwise.make_refresh(graphdef, param_shapes, plain_graphdef,
                                       plain_shapes, cfg.opt, cfg.seed)
      if cfg.grad_accum > 1:  # new rows from the first micro-batch's gradient
        whole_batch_refresh = refresh
        refresh = lambda state, batch: whole_batch_refresh(
            state, layerwise.first_micro_batch(batch, cfg.grad_accum))
    else:
      refresh = reparam.make_refresh(lambda p, b: loss_fn(p, plain_graphdef, b),
                                     graphdef, cfg.opt, cfg.seed)
  def step_function(refresh_subspaces: bool | None) -> Callable:
    if cfg.opt.layerwise and cfg.grad_accum > 1:
      return layerwise.make_accumulating_step(
          graphdef, tx, lr, param_shapes, precision.updater(cfg), TrainState,
          cfg.grad_accum, refresh=refresh_subspaces)
    if cfg.opt.layerwise:
      return layerwise.make_train_step(
          graphdef, tx, lr, param_shapes, precision.updater(cfg), TrainState,
          refresh=refresh_subspaces)
    return make_train_step(graphdef, tx, lr, cfg.grad_accum,
                           precision.updater(cfg), overwritten,
                           refresh=refresh_subspaces)

  # A subspax method refreshes its subspaces every `update_interval` steps;
  # the host knows the step, so an ordinary step and a refresh step are two
  # programs and neither decides at run time (a conditional per matrix, each
  # a host synchronisation on a GPU).
  two_programs = cfg.opt.name in subspax.METHODS and not model_cfg.reparam
  return Programs(model_cfg, graphdef, param_shapes, param_names, tx, lr, init,
                  step_function(None), refresh,
                  step_function(False) if two_programs else None,
                  step_function(True) if two_programs else None)


def is_refresh_step(step: int, update_interval: int) -> bool:
  """Whether train step `step` (1-based) refreshes the subspaces: the host's
  copy of the optimizer's rule (`count % update_interval == 0`, where the
  optimizer's count is `step - 1`), which picks the refresh step's program.

  Examples:
    >>> [s for s in range(1, 8) if is_refresh_step(s, 3)]
    [1, 4, 7]
  """
  return (step - 1) % update_interval == 0


def initial_state(cfg: ml_collections.ConfigDict, programs: Programs,
                  shardings: TrainState) -> TrainState:
  """The step-0 state, placed with `shardings`: a random init, or the weights
  of the Hugging Face checkpoint `cfg.init_from` (train/hf.py)."""
  if not cfg.get("init_from"):
    return jax.jit(programs.init, out_shardings=shardings)()
  dtype = programs.model_cfg.param_dtype
  params = hf.load_params(  # int8 kernels: read in float, quantized below
      cfg.init_from, programs.model_cfg, model_lib.as_float(programs.param_shapes, dtype),
      model_lib.as_float(shardings.params, dtype))

  def init(params):
    params = model_lib.quantize_like(params, programs.param_shapes)
    return TrainState(jnp.zeros((), jnp.int32), params,
                      programs.tx.init(model_lib.as_float(model_lib.trainable(
                          programs.graphdef, params), dtype)))
  return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def train_state_shardings(programs: Programs, mesh: jax.sharding.Mesh,
                          rules: dict[str, tuple[str, ...]]) -> TrainState:
  """NamedShardings of the train state: parameters by their logical names,
  optimizer states as `subspax.state_shardings` places them, step replicated."""
  param_shardings = sharding_lib.param_shardings(
      mesh, programs.param_shapes, programs.param_names, rules)
  return TrainState(
      sharding_lib.replicated(mesh), param_shardings,
      subspax.state_shardings(  # of the float parameters int8 kernels stand for
          programs.tx, model_lib.as_float(model_lib.trainable(
              programs.graphdef, programs.param_shapes), programs.model_cfg.param_dtype),
          model_lib.as_float(model_lib.trainable(programs.graphdef, param_shardings),
                             None)))


class Jitted(NamedTuple):
  """The jitted (not yet compiled) programs of a run, placed on its mesh."""

  train_step: Any  # (state, batch) -> (state, metrics), the state donated
  refresh: Any  # reparam modes: (state, batch) -> state, donated; else None
  batch: jax.ShapeDtypeStruct  # the global (B, L+1) int32 batch, sharded
  refresh_step: Any = None  # subspax methods: the refresh steps' train step


def jit_programs(programs: Programs, shardings: TrainState, mesh: jax.sharding.Mesh,
                 cfg: ml_collections.ConfigDict) -> Jitted:
  """Jits the train step and refresh program with the run's shardings.

  The trainer and its dry run (train/dry_run.py) compile these same programs,
  so the dry run's memory is the run's.
  """
  batch_sharding = sharding_lib.batch_sharding(mesh)
  jit_step = lambda step: jax.jit(
      step, in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  train_step = jit_step(programs.ordinary_step or programs.train_step)
  refresh_step = (None if programs.refresh_step is None
                  else jit_step(programs.refresh_step))
  refresh = None
  if programs.refresh is not None:
    refresh = jax.jit(
        programs.refresh, in_shardings=(shardings, batch_sharding),
        out_shardings=shardings, donate_argnums=0)
  batch = jax.ShapeDtypeStruct(
      (cfg.batch_size, cfg.seq_len + 1), jnp.int32, sharding=batch_sharding)
  return Jitted(train_step, refresh, batch, refresh_step)


class Result(NamedTuple):
  """What a run ends with."""

  state: TrainState  # the final train state, on the mesh
  metrics: dict[str, Any]  # the last metrics.jsonl record (empty off process 0)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> Result:
  """Trains to `cfg.steps` (or `cfg.stop_after`), resuming from `workdir`.

  Args:
    cfg: A full config (configs/base.py documents every field).
    workdir: Directory for checkpoints, metrics.jsonl and loss.png; a run
      resumes from its latest checkpoint.

  Returns:
    The final state and metrics record.

  Raises:
    ValueError / FileNotFoundError: on bad input, before any compute.
  """
  cfg = hf.configure(cfg)  # init_from: the checkpoint's model and tokenizer
  cfg = resume.adapt(cfg)  # e.g. optax_galore unrolls scanned layers (a note)
  # Everything that can be wrong with the input is checked first.
  mesh, rules, tx = check_and_mesh(cfg)
  profiler = metrics_lib.Profiler(cfg.profile_steps, workdir)  # checks profile_steps
  if (jax.default_backend() == "cpu" and mesh.size > 1 and cfg.model.scan
      and cfg.opt.name != "adamw"):
    print("warning: jaxlib 0.10's batched CPU LAPACK kernels (the SVD/QR of a "
          "stacked-layer subspace refresh) can deadlock with several CPU devices; "
          "if this run hangs, set model.scan=False", flush=True)
  data = data_lib.build_data(
      cfg.data, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
      seed=cfg.seed, process_index=jax.process_index(),
      process_count=jax.process_count(),
      min_over_processes=sharding_lib.min_over_processes)
  programs = build_programs(cfg, hf.vocab_size(cfg, data.vocab_size), tx)
  shardings = train_state_shardings(programs, mesh, rules)
  # Checkpoints of another config are refused before anything is written.
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=cfg.keep_checkpoints, config=resume.to_json(cfg))
  resume.check_config(checkpointer.saved_config(), cfg)
  if jax.process_index() == 0:
    hf.write_run_info(workdir, programs.model_cfg, cfg)  # for train.export
    tokenizer_lib.save(data.tokenizer, workdir)  # for train.generate
  param_shardings, init = shardings.params, programs.init
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  to_global = lambda b: sharding_lib.global_batch(b, batch_sharding)

  end = min(cfg.stop_after or cfg.steps, cfg.steps)
  with jax.set_mesh(mesh), preemption.watch() as stop:
    # The newest checkpoint that restores; damaged newer ones are moved aside.
    restored = checkpointer.restore_latest(
        checkpoint_lib.abstract(jax.eval_shape(init), shardings), data.train_iter)
    if restored is None:
      start = 0
      state = initial_state(cfg, programs, shardings)
    else:
      start, state = restored
      note = resume.steps_note(checkpointer.saved_config(start), cfg)
      if note and jax.process_index() == 0:
        print(note, flush=True)
      print(f"resumed from step {start} in {workdir}", flush=True)
    if start >= end:  # nothing to train: no compile, no progress bar
      checkpointer.close()
      return _finished(cfg, workdir, start, state)

    jitted = jit_programs(programs, shardings, mesh, cfg)
    compiled = jitted.train_step.lower(state, jitted.batch).compile()
    compiled_refresh = (None if jitted.refresh_step is None else
                        jitted.refresh_step.lower(state, jitted.batch).compile())
    refresh = jitted.refresh  # the reparametrised modes' merge / new-basis program
    eval_step = jax.jit(lambda p, b: loss_fn(p, programs.graphdef, b),
                        in_shardings=(param_shardings, batch_sharding),
                        out_shardings=replicated)

    state_bytes = subspax.state_bytes(state.opt_state)
    param_bytes = subspax.state_bytes(state.params)
    primary = jax.process_index() == 0
    if primary:
      mode = programs.model_cfg.reparam
      mode = (f" with {mode} subspace layers (rank {cfg.opt.rank}, refresh every "
              f"{cfg.opt.update_interval} steps)") if mode else ""
      print(f"model: {model_lib.count_params(programs.model_cfg):,} params, "
            f"vocab {data.vocab_size}; optimizer {cfg.opt.name}{mode}; mesh "
            f"{dict(mesh.shape)}", flush=True)
      print(memory_lib.report(
          memory_lib.compiled_memory(compiled), state_bytes, param_bytes,
          compiled_refresh and memory_lib.compiled_memory(compiled_refresh)),
            flush=True)

    writer = metrics_lib.Writer(workdir, start=start, total=cfg.steps, enabled=primary)
    timer = _Timer(start, tokens_per_step=cfg.batch_size * cfg.seq_len)
    pending = None  # (record, device metrics) of the last logged step dispatched
    stop.arm()  # a signal from here on finishes the step and saves it
    for step in range(start + 1, end + 1):
      profiler.before(step)
      batch = to_global(next(data.train_iter))
      refreshing = is_refresh_step(step, cfg.opt.update_interval)
      if refresh is not None and refreshing:
        state = refresh(state, batch)
      state, step_metrics = (compiled_refresh if compiled_refresh is not None
                             and refreshing else compiled)(state, batch)
      profiler.after(step, step_metrics)
      if pending is not None:  # read step t-1's metrics after dispatching step t
        writer.write(timer.finish(*pending))
        pending = None
      record = {"step": step, "opt/state_bytes": state_bytes}
      last = step == end or stop.signum is not None  # SIGINT / SIGTERM: save, stop
      if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
        jax.block_until_ready(step_metrics)  # this step's time is not eval time
        with timer.excluded():
          record.update(evaluate(eval_step, state.params, data.eval_batches(),
                                 cfg.eval_batches, to_global))
      if last or step % cfg.checkpoint_every == 0:
        checkpointer.save(step, state, data.train_iter)
      if last or step % cfg.log_every == 0 or "eval/loss" in record:
        pending = (record, step_metrics)
      if last:
        break
    if pending is not None:
      writer.write(timer.finish(*pending))
    profiler.close()
    writer.close()
    checkpointer.close()
    stop.raise_if_stopped(f"saved a checkpoint at step {step} in {workdir}")

  if not primary:
    return Result(state, {})
  print(f"wrote {metrics_lib.plot(workdir, f'{cfg.opt.name}, {workdir}')}", flush=True)
  return Result(state, metrics_lib.read(workdir)[-1])


def _finished(cfg: ml_collections.ConfigDict, workdir: str, step: int,
              state: TrainState) -> Result:
  """The result of a run whose checkpoint is already at its last step."""
  records = metrics_lib.read(workdir) if jax.process_index() == 0 else []
  if jax.process_index() == 0:
    until = (f"stop_after={cfg.stop_after}" if cfg.stop_after and cfg.stop_after < cfg.steps
             else f"steps={cfg.steps}")
    print(f"{workdir} holds a finished run (its checkpoint is at step {step}, "
          f"{until}); nothing to train: raise --config.steps to train further (the "
          "learning-rate schedule then changes for the new steps), or pass a new "
          "--workdir", flush=True)
  return Result(state, records[-1] if records else {})


class _Timer:
  """Step time and throughput between metric readouts, excluding evaluation."""

  def __init__(self, step: int, *, tokens_per_step: int):
    self._step = step
    self._time = time.perf_counter()
    self._tokens_per_step = tokens_per_step

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    """Leaves the time spent inside the block out of the step times."""
    begin = time.perf_counter()
    yield
    self._time += time.perf_counter() - begin

  def finish(self, record: dict[str, Any], step_metrics: dict[str, jax.Array]
             ) -> dict[str, Any]:
    """Fetches a step's metrics (blocking) and completes its record."""
    record.update({k: float(v) for k, v in jax.device_get(step_metrics).items()})
    now = time.perf_counter()
    step_time = (now - self._time) / (record["step"] - self._step)
    record["perf/step_time"] = step_time
    record["perf/tokens_per_sec"] = self._tokens_per_step / step_time
    self._step, self._time = record["step"], now
    return record

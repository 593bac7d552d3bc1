"""Checkpoints: the train state and the data-iterator position, saved together.

An orbax `CheckpointManager` under `workdir/checkpoints` holds two items per
step: `state` (params, optimizer state and step; sharded arrays, saved
asynchronously; zero-size placeholders, such as optax.contrib.galore keeps,
are left out and recreated) and `data` (each process's grain iterator state as
JSON, `process_<i>-of-<n>.json`). It keeps the latest `keep` steps. A step directory
only appears once both items are complete, so a run killed mid-save resumes
from the previous checkpoint.

With a `config`, each step also stores the run's config (`config/metadata`,
JSON), which a restart compares with its own (train/resume.py).

`restore_params` reads only the model's weights of a step, on one device,
for train.export and train.generate.

`restore_latest` validates before it trusts: a step directory with a missing
file or whose arrays do not read back is reported in one line, moved aside to
`workdir/checkpoints.damaged/<step>` (never deleted) and the next newest step is
tried; if no step restores, nothing is moved and a `UserError` says how to start
fresh.
"""

import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train import errors
from train import model as model_lib
from train import reparam

DAMAGED = "checkpoints.damaged"  # where damaged step directories are moved


class _UnreadArrayErrors(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's reads.

  orbax reads a checkpoint's arrays in concurrent tasks. When several fail
  (a damaged checkpoint), the first failure is raised and reported (the
  fallback's warning, or the one-line error), and asyncio later logs each
  other failed read with its traceback, after the run has already said what
  happened.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("never retrieved" in message and "deserialize" in message)


logging.getLogger("asyncio").addFilter(_UnreadArrayErrors())


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step."""

  def __init__(self, workdir: str, *, keep: int, config: dict | None = None):
    """Opens (creating it) `workdir/checkpoints`.

    Args:
      workdir: The run directory.
      keep: How many of the latest steps to keep.
      config: The run's config as a JSON-serialisable dict, stored with every
        step; None stores none.
    """
    self._workdir = workdir
    self._config = config
    self._directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    if config is not None:
      handlers["config"] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(
        self._directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def saved_config(self, step: int | None = None) -> tuple[int, dict] | None:
    """(step, config) of the newest step that stored a readable config, or None.

    With `step`, that step's config only (None if it stored none).
    """
    steps = [step] if step is not None else self._manager.all_steps()
    for step in sorted(steps, reverse=True):
      try:
        with open(os.path.join(self._directory, str(step), "config", "metadata")) as f:
          config = json.load(f)
      except (OSError, ValueError):
        continue
      if isinstance(config, dict):
        return step, config
    return None

  def restore_latest(self, abstract_state: Any, data_iter: grain.DatasetIterator
                     ) -> tuple[int, Any] | None:
    """Restores the newest step that is complete and reads back.

    Damaged steps newer than it are reported in one line each and moved aside
    (see the module docstring).

    Args:
      abstract_state: Pytree of `jax.ShapeDtypeStruct`s with shardings.
      data_iter: This process's training iterator, moved to the saved position.

    Returns:
      (step, state), or None when the workdir holds no checkpoint.

    Raises:
      UserError: there are checkpoints but none restores (nothing is moved).
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = self._missing_file(step)
      if problem is None:
        try:
          state = self.restore(step, abstract_state, data_iter)
        except Exception as e:  # pylint: disable=broad-exception-caught
          problem = f"its arrays do not read back: {_first_line(e)}"
        else:
          self._set_aside(damaged)
          return step, state
      damaged.append((step, problem))
    if not damaged:
      return None
    raise errors.UserError(
        f"no checkpoint in {self._directory} can be restored ("
        + "; ".join(f"step {s}: {p}" for s, p in damaged)
        + "); to start fresh, move that directory away or pass a new --workdir")

  def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
    """Moves damaged step directories to `workdir/checkpoints.damaged`."""
    for step, problem in damaged:
      target = os.path.join(os.path.dirname(self._directory), DAMAGED, str(step))
      target = _free_path(target)
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(self._directory, str(step)), target)
        print(f"warning: the checkpoint at step {step} is damaged ({problem}); "
              f"moved it to {target}; resuming from an earlier one", flush=True)
    if damaged:
      self._manager.reload()

  def _missing_file(self, step: int) -> str | None:
    """What a step directory lacks of the files a restore reads, or None."""
    data = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                 f"data/{data}"):
      path = os.path.join(self._directory, str(step), name)
      if not os.path.isfile(path):
        return f"{name} is missing"
      if not os.path.getsize(path):
        return f"{name} is empty"
    return None

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator) -> None:
    """Starts saving `state` and the iterator position at `step` (async).

    The arrays are copied off the device before this returns, so `state` may
    be donated to the next step right away.
    """
    items = dict(state=ocp.args.StandardSave(_drop_empty(state)),
                 data=grain.checkpoint.CheckpointSave(data_iter))
    if self._config is not None:
      items["config"] = ocp.args.JsonSave(self._config)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator) -> Any:
    """Restores the state at `step` into `abstract_state`'s shapes and shardings.

    Also moves `data_iter` to the saved position.

    Args:
      step: A step returned by `latest_step`.
      abstract_state: Pytree of `jax.ShapeDtypeStruct`s with shardings.
      data_iter: This process's training iterator.

    Returns:
      The restored state, placed with the target shardings.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_drop_empty(abstract_state)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return jax.tree.map(
        lambda x, a: jnp.zeros(a.shape, a.dtype, device=a.sharding) if x is None else x,
        restored.state, abstract_state, is_leaf=lambda x: x is None)

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()


def _first_line(error: BaseException) -> str:
  """The first line of an error message, at most 160 characters."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  line = line.split(" See full TensorStore details")[0]
  return line if len(line) <= 160 else line[:157] + "..."


def _free_path(path: str) -> str:
  """`path`, or `path-1`, `path-2`, ... if it exists."""
  candidate, i = path, 0
  while os.path.exists(candidate):
    i += 1
    candidate = f"{path}-{i}"
  return candidate


def _drop_empty(tree: Any) -> Any:
  """Replaces zero-size arrays (orbax cannot save them) by None."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def restore_params(workdir: str, cfg: model_lib.LlamaConfig,
                   step: int | None = None) -> tuple[int, dict]:
  """The parameters of a run's checkpoint, on the default device.

  Args:
    workdir: The run directory.
    cfg: The run's model config (`hf.read_run_info`).
    step: The checkpoint step; None for the latest.

  Returns:
    (step, params) with the deltas of reparametrised layers merged and dropped
    and int8 kernels dequantized to `cfg.param_dtype` (the parameters of the
    float model, `kernel_format="float"`).

  Raises:
    errors.UserError: the workdir has no such checkpoint.
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=False))
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
  if step is None or step not in steps:
    raise errors.MissingFileError(
        f"--step: {workdir!r} has no checkpoint {'' if step is None else step} "
        f"(it has {sorted(steps) or 'none'}); give one of its steps")
  graphdef, shapes, _ = model_lib.abstract_model(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  item = {"params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  params = restored.state["params"]
  manager.close()
  if cfg.reparam:
    params = reparam.merged_weights(graphdef, params, cfg.reparam_side)
  return step, model_lib.as_float(params, cfg.param_dtype)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Checkpoints: the train state and the data-iterator position, saved together.

An orbax `CheckpointManager` under `workdir/checkpoints` holds two items per
step: `state` (params, optimizer state and step; sharded arrays, saved
asynchronously; zero-size placeholders, such as optax.contrib.galore keeps,
are left out and recreated) and `data` (each process's grain iterator state as
JSON, `process_<i>-of-<n>.json`). It keeps the latest `keep` steps. A step directory
only appears once both items are complete, so a run killed mid-save resumes
from the previous checkpoint.
"""

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step."""

  def __init__(self, workdir: str, *, keep: int):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator) -> None:
    """Starts saving `state` and the iterator position at `step` (async).

    The arrays are copied off the device before this returns, so `state` may
    be donated to the next step right away.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_drop_empty(state)),
        data=grain.checkpoint.CheckpointSave(data_iter)))

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


def _drop_empty(tree: Any) -> Any:
  """Replaces zero-size arrays (orbax cannot save them) by None."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Device mesh, logical-axis rules, and how parameters and batches are placed.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data
parallelism whose parameters and optimizer state are sharded too) and `tensor`
(model parallelism inside a layer). The model names its parameter axes
logically (`embed`, `mlp`, `heads`, `vocab`, `layers`); the config's
`mesh.rules` maps each logical name to mesh axes. Batches are split over
('data', 'fsdp').
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator_address: str = "",
                                 num_processes: int = 1,
                                 process_id: int = 0, *,
                                 auto: bool = False) -> None:
  """Joins a multi-process run when asked to, before any other JAX call.

  Each argument falls back to the environment variable JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES or JAX_PROCESS_ID. Nothing happens for a single process,
  unless `auto` asks JAX to detect the run from its cluster environment
  (SLURM, Open MPI, Kubernetes, Cloud TPU: `jax.distributed.initialize()` with
  no arguments; docs/multihost.md).

  Args:
    coordinator_address: host:port of process 0's coordination service.
    num_processes: Total number of processes.
    process_id: This process's index in [0, num_processes).
    auto: Let JAX detect what the arguments and variables leave unset.

  Raises:
    UserError: a partial setting, or `auto` outside a cluster JAX knows.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  if num_processes == 1:
    num_processes = int(env.get("JAX_NUM_PROCESSES", "1"))
  if process_id == 0:
    process_id = int(env.get("JAX_PROCESS_ID", "0"))
  if auto:
    given = dict(coordinator_address=coordinator_address or None,
                 num_processes=num_processes if num_processes > 1 else None,
                 process_id=process_id if num_processes > 1 else None)
    try:
      jax.distributed.initialize(**given)
    except (ValueError, RuntimeError) as e:
      raise errors.UserError(
          f"--multihost: JAX detects no cluster here ({' '.join(str(e).split())}); "
          "run it under SLURM, Open MPI or Kubernetes, or pass "
          "--coordinator_address, --num_processes and --process_id") from None
    return
  if not coordinator_address and num_processes == 1:
    return
  if not coordinator_address or num_processes < 2:
    raise errors.UserError(
        "a multi-process run needs both a coordinator address and a process count "
        f"> 1, got coordinator_address={coordinator_address!r}, "
        f"num_processes={num_processes}")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def min_over_processes(value: int) -> int:
  """The minimum of a host-side int over all processes (an all-gather).

  Every process must call it, at the same point of the program.

  Example:
    n = min_over_processes(len(eval_windows))  # the same on every process

  Args:
    value: this process's int.

  Returns:
    The smallest of the processes' values (`value` with one process).
  """
  if jax.process_count() == 1:
    return value
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
  return int(np.min(gathered))


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int, int]:
  """Resolves the configured (data, fsdp, tensor) sizes; -1 fills the rest.

  Args:
    mesh_cfg: The `mesh` ConfigDict with integer fields data, fsdp and tensor.
    n_devices: Number of devices available.

  Returns:
    The three axis sizes. Their product divides n_devices (it equals it when a
    size is -1).

  Raises:
    UserError: if more than one size is -1, a size is not positive, or the
      sizes do not divide the device count.
  """
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  named = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise errors.UserError(f"mesh sizes must be positive with at most one -1, got {named}")
  fixed = math.prod(s for s in sizes if s != -1)
  if n_devices % fixed:
    raise errors.UserError(
        f"the mesh ({named}) does not divide the {n_devices} available devices: "
        "choose sizes whose product divides the device count")
  if -1 in sizes:
    sizes[sizes.index(-1)] = n_devices // fixed
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axes.

  A mesh smaller than the device count uses the first devices (single process
  only: with several processes it must span all of them).

  Args:
    mesh_cfg: The `mesh` ConfigDict.
    devices: The devices to lay the mesh over; default `jax.devices()`. A
      dry run for another target passes its compile-only devices
      (`train.targets.devices`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  n = math.prod(shape)
  if n < len(devices) and jax.process_count() > 1:
    raise errors.UserError(
        f"a multi-process mesh must use all {len(devices)} devices, got "
        f"{dict(zip(MESH_AXES, shape))}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:n])


def parse_rules(rules_cfg: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
  """Parses `mesh.rules` ({logical: 'axis' | 'axis1,axis2' | ''}) into tuples."""
  rules = {}
  for logical, axes in rules_cfg.items():
    parsed = tuple(a for a in axes.split(",") if a)
    unknown = [a for a in parsed if a not in MESH_AXES]
    if unknown:
      raise errors.UserError(
          f"mesh.rules.{logical}={axes!r} names unknown mesh axes {unknown}; "
          f"use a comma-separated subset of {MESH_AXES} or '' (replicated)")
    rules[logical] = parsed
  return rules


def logical_to_spec(names: P, rules: Mapping[str, tuple[str, ...]]) -> P:
  """Maps a PartitionSpec of logical axis names to one of mesh axes."""
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
    elif name not in rules:
      raise errors.UserError(f"no mesh.rules entry for logical axis {name!r}")
    else:
      axes = rules[name]
      spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def param_shardings(mesh: Mesh, shapes: Any, names: Any,
                    rules: Mapping[str, tuple[str, ...]]) -> Any:
  """NamedShardings for every parameter, checking that each split is even.

  Args:
    mesh: The device mesh.
    shapes: Pytree of arrays or ShapeDtypeStructs.
    names: Matching pytree of PartitionSpecs of logical axis names.
    rules: Parsed `mesh.rules`.

  Returns:
    A matching pytree of `NamedSharding`s.

  Raises:
    UserError: if a parameter dimension is not divisible by its mesh axes.
  """
  def one(path, shape, logical):
    spec = logical_to_spec(logical, rules)
    for dim, axes in zip(shape.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        raise errors.UserError(
            f"parameter {jax.tree_util.keystr(path)} {shape.shape} cannot be split "
            f"evenly: dimension {dim} over mesh axes {axes} of size {size}; change "
            "the mesh or mesh.rules")
    return NamedSharding(mesh, spec)

  return jax.tree.map_with_path(one, shapes, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches (B, L+1) are split along B over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def split_batch(x: jax.Array) -> jax.Array:
  """Keeps an activation split along its batch (first) axis over the data axes.

  Without it, XLA's sharding propagation may give a block's activations the
  parameters' layout (d_model over `fsdp`) and compute the whole batch on
  every device. A no-op outside a mesh context (`jax.set_mesh`), on a mesh
  without data axes, or where the batch does not divide.

  Examples:
    >>> import jax.numpy as jnp
    >>> split_batch(jnp.ones((2, 3))).shape  # no mesh in context: unchanged
    (2, 3)

  Args:
    x: An activation whose first axis is the batch.

  Returns:
    `x`, constrained to `P(('data', 'fsdp'), None, ...)` where that applies.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *(None,) * (x.ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the mesh and returns the local batch.

  Raises:
    UserError: if batch_size is not divisible by data * fsdp, or by the
      process count.
  """
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % ways:
    raise errors.UserError(
        f"batch_size={batch_size} is not divisible by the data axes "
        f"(mesh.data * mesh.fsdp = {mesh.shape['data']} * {mesh.shape['fsdp']} = "
        f"{ways}); choose a multiple of {ways}")
  if batch_size % jax.process_count():
    raise errors.UserError(
        f"batch_size={batch_size} is not divisible by the {jax.process_count()} "
        "processes")
  return batch_size // jax.process_count()


def global_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles the global batch from this process's rows."""
  return jax.make_array_from_process_local_data(sharding, local_batch)

"""Compile targets: XLA's GPU compiler on a machine without a GPU.

`python -m train ... --dry_run --target=h100` compiles the train step for an
NVIDIA H100 on any machine, a CPU-only one included: JAX builds compile-only
devices from a GPU description (a `stream_executor.GpuTargetConfigProto`,
the text files in `train/gpu_targets/`) and XLA's GPU compiler lowers, fuses,
schedules and assigns buffers for them exactly as it would on the card
("deviceless" ahead-of-time compilation). Nothing runs, so the figures are the
compiler's estimate for that program. A deviceless compile cannot autotune:
matmuls become Triton GEMM fusions rather than cuBLAS calls, which changes
workspace sizes a little, not the program's buffers.

A target is a name, or the path of a `.txtpb` spec file, with an optional
device count `xN` (the devices of one host, over which the mesh is laid):

  h100, h100x8     NVIDIA H100 SXM 80 GB (one device, one 8-GPU host)
  h200             NVIDIA H200 141 GB
  a100_80, a100_40 NVIDIA A100 SXM 80 GB / 40 GB
  cpu              the machine's CPU
  (empty)          the machine's default devices (the default)

The GPU compiler comes with the `gpu-compile` extra (`pip install -e
".[gpu-compile]"`): jax's CUDA plugin at jaxlib's version, without the CUDA
runtime, and `nvidia-cuda-nvcc-cu12` for `ptxas`, which XLA runs on the PTX it
generates.
"""

import dataclasses
import importlib.util
import os
import re

import jax

from train import errors

SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# name -> the spec file in SPEC_DIR.
SPECS = {
    "h100": "h100_sxm.txtpb",
    "h200": "h200.txtpb",
    "a100_80": "a100_sxm_80.txtpb",
    "a100_40": "a100_sxm_40.txtpb",
}
CPU = "cpu"
LOCAL = ""  # the machine's default backend
EXTRA = 'pip install -e ".[gpu-compile]"'


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed `--target`.

  Attributes:
    name: As given, e.g. "h100x8".
    spec: The GpuTargetConfigProto file, or None for the CPU.
    count: Compile-only devices to make (None: the machine's own devices).
  """
  name: str
  spec: str | None = None
  count: int | None = None
  cpu: bool = False

  @property
  def is_gpu(self) -> bool:
    return self.spec is not None


def parse(name: str) -> Target:
  """Parses a target name: `NAME[xN]` or `PATH.txtpb[xN]`, "cpu" or "".

  Examples:
    >>> parse("h100x8").count
    8
    >>> os.path.basename(parse("a100_40").spec)
    'a100_sxm_40.txtpb'
    >>> parse("cpu").is_gpu
    False

  Args:
    name: The `--target` value.

  Returns:
    The target.

  Raises:
    errors.UserError: an unknown name, a missing spec file, or a count < 1.
  """
  if name == LOCAL:
    return Target(LOCAL)
  if name == CPU:
    return Target(CPU, cpu=True)
  match = re.fullmatch(r"(.+?)(?:x(\d+))?", name)
  base, count = match.group(1), int(match.group(2) or 1)
  if count < 1:
    raise errors.UserError(f"--target={name}: the device count after 'x' must be >= 1")
  if base in SPECS:
    return Target(name, os.path.join(SPEC_DIR, SPECS[base]), count)
  if base.endswith(".txtpb"):
    if not os.path.isfile(base):
      raise errors.MissingFileError(f"--target={name}: no such spec file {base!r}")
    return Target(name, base, count)
  raise errors.UserError(
      f"--target={name}: unknown target; use one of {', '.join([CPU, *SPECS])} "
      "(optionally with xN devices, e.g. h100x8) or the path of a "
      "GpuTargetConfigProto .txtpb file")


def _check_gpu_compiler() -> None:
  """Fails with one line when the CUDA plugin or ptxas is not installed."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise errors.UserError(
        "--target: compiling for a GPU needs jax's CUDA plugin; install it with "
        f"{EXTRA} (no GPU or CUDA runtime needed)")


def devices(target: Target) -> list[jax.Device]:
  """The devices to compile for: compile-only GPU devices, or the machine's.

  The GPU devices exist only to be compiled for: `jax.jit(...).lower(
  <ShapeDtypeStructs sharded over them>).compile()` works and
  `memory_analysis()` reports the GPU program's buffers; nothing can run.

  Args:
    target: A parsed target.

  Returns:
    `target.count` compile-only devices, or the machine's devices.

  Raises:
    errors.UserError: the `gpu-compile` extra is missing, or the spec does not
      parse.
  """
  if not target.is_gpu:
    return jax.devices(CPU) if target.cpu else jax.devices()
  _check_gpu_compiler()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with open(target.spec) as f:
    spec = f.read()
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{target.count}", target_config=spec)
  except Exception as e:  # a proto jaxlib cannot parse; a plugin that fails to load
    raise errors.UserError(
        f"--target={target.name}: jaxlib cannot compile for this spec "
        f"({' '.join(str(e).split())[:300]}); the spec must parse as the "
        "GpuTargetConfigProto of the installed jaxlib") from e
  return list(topology.devices)


def prepare(target: Target) -> None:
  """Sets JAX up for `target`; call before anything starts a backend."""
  if target.is_gpu or target.cpu:
    use_cpu_backend()


def use_cpu_backend() -> None:
  """Keeps JAX on its CPU backend, so the CUDA plugin never looks for a GPU.

  Call before anything starts a backend. A deviceless compile needs the
  plugin's compiler, not a device: without this, the plugin would try to load
  the CUDA runtime (and print its failure) on a machine with no GPU.
  """
  jax.config.update("jax_platforms", CPU)


def compiler_name(target: Target, device: jax.Device) -> str:
  """Which XLA compiler a program compiled for `device` came from.

  Examples:
    >>> compiler_name(parse("cpu"), jax.devices("cpu")[0])
    'XLA CPU compiler'
  """
  if device.platform == "cpu":
    return "XLA CPU compiler"
  how = " (deviceless)" if target.is_gpu else ""
  return f"XLA GPU compiler, {device.device_kind}{how}"

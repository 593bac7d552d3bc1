"""Command line: `python -m train --config configs/<preset>.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.opt.name=adamw
--config.opt.rank=32 --config.steps=500`, and a method's own options are the
fields of its section, e.g. `--config.opt.subtrack.eta=5` (configs/base.py). `--workdir` defaults to
`runs/<preset>-<opt.name>`; a run started in a workdir that holds a checkpoint
resumes from it. `--dry_run` compiles the train step from abstract shapes,
prints its memory and writes `WORKDIR/memory.json` without allocating the
model or reading data (train/dry_run.py); `--target=h100` (or h100x8, h200,
a100_80, a100_40) makes it compile with XLA's GPU compiler for that GPU, on a
machine without one (train/targets.py). For several processes, pass
`--coordinator_address`, `--num_processes` and `--process_id` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID), or
`--multihost` under SLURM, Open MPI or Kubernetes, where JAX detects them
(docs/multihost.md).

`--config` takes a preset file; a path that does not exist names the packaged
preset of the same name (`--config configs/test.py` or `--config test` work
from any directory). Relative paths (`--workdir`, `data.files`, `data.dir`)
are relative to the directory the command runs in.

An input error (config, data, mesh, checkpoint) prints one line, `error: ...`,
and exits with status 2; `--verbose` shows its traceback. SIGINT (Ctrl-C) and
SIGTERM finish the current step, save a checkpoint and exit with status 130
and 143 (train/preemption.py); the same command then resumes.
"""

import contextlib
import glob
import os
import sys

# `python -m train` has imported the package first (train/__init__.py pins
# OpenBLAS to one thread before numpy and jax load).
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs
from train import dry_run
from train import errors
from train import preemption
from train import sharding
from train import targets
from train import train


def _exit_on_unknown_key(error: Exception) -> None:
  """Turns config_flags' error for a misspelt `--config.a.b=` into one line."""
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]  # AttributeError(KeyError("'key'\nDid you mean ..."))
  key, *hint = str(message).split("\n", 1)
  key = key.strip("'\"")
  bad = [a for a in sys.argv[1:]
         if a.startswith("--config.") and key in a.split("=")[0].split(".")]
  _fail(f"unknown config key {key!r} in {' '.join(bad) or sys.argv[1:]}"
        + (f" ({hint[0]})" if hint else "") + "; see configs/base.py for the fields")


def _fail(message: str) -> None:
  """Prints `error: <message>` as one line to stderr and exits with status 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_STATUS)


_PRESETS = os.path.dirname(os.path.abspath(configs.__file__))


def _preset_path(value: str) -> str:
  """`--config`'s file: the path itself, else the packaged preset of that name."""
  path, _, rest = value.partition(":")  # config_flags' "file.py:arg" form
  if os.path.isfile(path):
    return value
  name = os.path.basename(path)
  packaged = os.path.join(_PRESETS, name if name.endswith(".py") else f"{name}.py")
  if os.path.isfile(packaged) and name != "__init__.py":
    return packaged + (f":{rest}" if rest else "")
  presets = sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(_PRESETS, "*.py")) if not p.endswith(("__init__.py", "base.py")))
  _fail(f"--config: no preset file {path!r}; give a path, or one of the packaged "
        f"presets {', '.join(presets)} (e.g. --config configs/tiny.py)")


def _with_preset_paths(argv: list[str]) -> list[str]:
  """argv with `--config`'s value resolved by `_preset_path`."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + _preset_path(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = _preset_path(argv[i + 1])
  return argv


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_PRESETS, "tiny.py"),
      "Preset file, configs/<name>.py (or a packaged preset's name).",
      lock_config=True)
except (AttributeError, KeyError) as e:
  _exit_on_unknown_key(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; default runs/<preset>-<opt.name>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-host run that JAX detects from the cluster "
    "(SLURM, Open MPI, Kubernetes); docs/multihost.md.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of an input error, not just its line.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile the train step from abstract shapes, print its "
    "memory and write WORKDIR/memory.json; allocates nothing, reads no data.")
_TARGET = flags.DEFINE_string(
    "target", "", "With --dry_run: compile for this machine's devices (the "
    "default), its CPU ('cpu') or, deviceless, for a GPU: h100, h100x8, h200, a100_80, a100_40, or a "
    "GpuTargetConfigProto .txtpb file, optionally with xN devices "
    "(train/targets.py; needs the gpu-compile extra).")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(_with_preset_paths(argv))
  except (AttributeError, KeyError) as e:
    _exit_on_unknown_key(e)
  except (flags.Error, OSError) as e:  # a bad flag value; a preset that fails to load
    if "--verbose" in argv:
      raise
    _fail(str(e).split("\n", 1)[0] if isinstance(e, flags.Error) else str(e))


@contextlib.contextmanager
def _reporting():
  """Turns input errors and signals into one line and an exit status."""
  try:
    yield
  except errors.UserError as e:
    if _VERBOSE.value:
      raise
    # A failed restore leaves orbax's read coroutines with their exception;
    # collected at exit, Python would print each one's traceback after the
    # error line. The error already says what went wrong.
    sys.unraisablehook = lambda unraisable: None
    _fail(str(e))
  except preemption.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    print("stopped by SIGINT before training started; nothing to save",
          file=sys.stderr, flush=True)
    sys.exit(128 + 2)


def main(argv: list[str]) -> None:
  with _reporting():
    _main(argv)


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  target = targets.parse(_TARGET.value)
  if target.is_gpu and not _DRY_RUN.value:
    raise errors.UserError(
        f"--target={_TARGET.value} compiles for a GPU without one and needs "
        "--dry_run; to train on a GPU, run on it without --target")
  targets.prepare(target)
  # Joining a multi-process run must come before any computation.
  sharding.maybe_initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      auto=_MULTIHOST.value)
  cfg = _CONFIG.value
  preset = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", f"{preset}-{cfg.opt.name}")
  if _DRY_RUN.value:
    dry_run.run_dry(cfg, workdir, _TARGET.value)
  else:
    train.run(cfg, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

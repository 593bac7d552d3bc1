"""Command line: `python -m train --config configs/<preset>.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.opt.name=adamw
--config.opt.rank=32 --config.steps=500`. `--workdir` defaults to
`runs/<preset>-<opt.name>`; a run started in a workdir that holds a checkpoint
resumes from it. `--dry_run` compiles the train step from abstract shapes,
prints its memory and writes `WORKDIR/memory.json` without allocating the
model or reading data (train/dry_run.py). For several processes, pass
`--coordinator_address`, `--num_processes` and `--process_id` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID).
"""

import os
import sys

# jaxlib's CPU LAPACK kernels (SVD, QR, eigh of a subspace refresh) already run
# a batch in parallel; nested OpenBLAS threads busy-wait and made a refresh of
# stacked (L, m, n) kernels ~100x slower on 2 cores. Set before numpy/jax load.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import dry_run
from train import sharding
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
  sys.exit(f"error: unknown config key {key!r} in {' '.join(bad) or sys.argv[1:]}"
           + (f" ({hint[0]})" if hint else "") + "; see configs/base.py for the fields")


try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/tiny.py", "Preset file, configs/<name>.py.",
      lock_config=True)
except (AttributeError, KeyError) as e:
  _exit_on_unknown_key(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; default runs/<preset>-<opt.name>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile the train step from abstract shapes, print its "
    "memory and write WORKDIR/memory.json; allocates nothing, reads no data.")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _exit_on_unknown_key(e)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  # Joining a multi-process run must come before any computation.
  sharding.maybe_initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cfg = _CONFIG.value
  preset = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", f"{preset}-{cfg.opt.name}")
  if _DRY_RUN.value:
    dry_run.run_dry(cfg, workdir)
  else:
    train.run(cfg, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

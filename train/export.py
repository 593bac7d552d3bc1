"""Command line: `python -m train.export --workdir W --out DIR [--step N] [--overwrite]`.

Writes the model of a run's checkpoint (the latest, or step N) as a Hugging
Face LLaMA directory, `config.json` plus `*.safetensors` (train/hf.py), with the
run's tokenizer beside it, which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. Reparametrised
runs (GRASS sparse gradients, RSO) have their deltas merged into the kernels
first. Only the parameters are read from the checkpoint, not the optimizer
state.

The export is written into a temporary directory beside `--out` and renamed
into place when complete, so an interrupted export never leaves a half-written
`--out`. A non-empty `--out` is refused unless `--overwrite` is given. Every
file gets the permissions of a file the user creates (0644 under umask 022).

Example:

  python -m train --config configs/tiny.py --config.init_from=llama-dir --workdir runs/ft
  python -m train.export --workdir runs/ft --out runs/ft/hf
"""

import os
import shutil
import sys
import tempfile
from collections.abc import Callable

# `python -m train.export` has imported the package first (train/__init__.py
# pins OpenBLAS to one thread before numpy and jax load).
from absl import app
from absl import flags
from absl import logging

from train import checkpoint as checkpoint_lib
from train import errors
from train import hf
from train import model as model_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of `python -m train`.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face model to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a non-empty --out directory.")


def _user_modes(directory: str) -> None:
  """Gives `directory` and its files the modes of ones the user creates.

  safetensors writes its files 0600 and `tempfile.mkdtemp` makes 0700; an
  export is for sharing, like the JSON files `open` writes (0666 & ~umask).
  """
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def check_out(out: str, overwrite: bool) -> None:
  """Refuses an `out` that is a file, or a non-empty directory unless `overwrite`.

  Raises:
    errors.UserError: naming `--out` and the fix.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.UserError(f"--out={out!r} is a file; give a directory to write")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise errors.UserError(
        f"--out={out!r} is not empty; pass --overwrite to replace it, or give "
        "a new directory")


def write_atomically(out: str, write: Callable[[str], object],
                     overwrite: bool = False) -> str:
  """Runs `write(directory)` on a temporary directory, then renames it to `out`.

  Example:
    write_atomically("runs/ft/hf", lambda d: hf.save(d, params, cfg))

  Args:
    out: The directory to create (or to replace, with `overwrite`).
    write: Writes the files into the directory it is given.
    overwrite: Replace a non-empty `out`; otherwise it is refused.

  Returns:
    `out`.

  Raises:
    errors.UserError: `out` is a file, or a non-empty directory and not
      `overwrite`; nothing is written then.
  """
  check_out(out, overwrite)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  try:
    write(staging)
    _user_modes(staging)
    aside = None
    if os.path.isdir(out) and os.listdir(out):
      aside = staging + ".old"
      os.rename(out, aside)
    os.rename(staging, out)  # onto an empty directory too (POSIX)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if aside:
    shutil.rmtree(aside)
  return out


def export(workdir: str, out: str, step: int | None = None,
           overwrite: bool = False) -> str:
  """Writes a run's checkpoint as a Hugging Face directory, atomically.

  Example:
    export("runs/ft", "runs/ft/hf")  # the latest checkpoint

  Args:
    workdir: The run directory (holds `model.json` and `checkpoints/`).
    out: The directory to write (`write_atomically`).
    step: The checkpoint step; None for the latest.
    overwrite: Replace a non-empty `out`.

  Returns:
    `out`.

  Raises:
    errors.UserError: no such checkpoint, or `out` is not empty and not
      `overwrite`.
  """
  check_out(out, overwrite)  # before the (slow) restore
  info = hf.read_run_info(workdir)
  cfg = info["model"]
  step, params = checkpoint_lib.restore_params(workdir, cfg, step)
  base = info["base_config"]
  extra = {} if base else {"max_position_embeddings": info["seq_len"]}
  write_atomically(out, lambda directory: hf.save(
      directory, params, cfg, base_config=base,
      tokenizer_files=tuple(info["tokenizer_files"]), **extra), overwrite)
  print(f"wrote {out}: step {step} of {workdir}, {model_lib.count_params(cfg):,} "
        "params, LlamaForCausalLM", flush=True)
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value or not _OUT.value:
    sys.exit("error: --workdir and --out are required, e.g. "
             "python -m train.export --workdir runs/ft --out runs/ft/hf")
  try:
    export(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_STATUS)


if __name__ == "__main__":
  app.run(main)

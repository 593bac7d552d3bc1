"""Command line: `python -m train.export --workdir W --out DIR [--step N]`.

Writes the model of a run's checkpoint (the latest, or step N) as a Hugging
Face LLaMA directory, `config.json` plus `*.safetensors` (train/hf.py), with the
run's tokenizer beside it, which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. Reparametrised
runs (GRASS sparse gradients, RSO) have their deltas merged into the kernels
first. Only the parameters are read from the checkpoint, not the optimizer
state.

Example:

  python -m train --config configs/tiny.py --config.init_from=llama-dir --workdir runs/ft
  python -m train.export --workdir runs/ft --out runs/ft/hf
"""

import os
import sys

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


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes a run's checkpoint as a Hugging Face directory.

  Args:
    workdir: The run directory (holds `model.json` and `checkpoints/`).
    out: The directory to write.
    step: The checkpoint step; None for the latest.

  Returns:
    `out`.
  """
  info = hf.read_run_info(workdir)
  cfg = info["model"]
  step, params = checkpoint_lib.restore_params(workdir, cfg, step)
  base = info["base_config"]
  extra = {} if base else {"max_position_embeddings": info["seq_len"]}
  hf.save(out, params, cfg, base_config=base,
          tokenizer_files=tuple(info["tokenizer_files"]), **extra)
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
    export(_WORKDIR.value, _OUT.value, _STEP.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_STATUS)


if __name__ == "__main__":
  app.run(main)

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
import jax
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging

from train import errors
from train import hf
from train import model as model_lib
from train import reparam

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of `python -m train`.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face model to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")


def restore_params(workdir: str, cfg: model_lib.LlamaConfig,
                   step: int | None = None) -> tuple[int, dict]:
  """The parameters of a run's checkpoint, on the default device.

  Args:
    workdir: The run directory.
    cfg: The run's model config (`hf.read_run_info`).
    step: The checkpoint step; None for the latest.

  Returns:
    (step, params) with the deltas of reparametrised layers merged and dropped.

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
  return step, params


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
  step, params = restore_params(workdir, cfg, step)
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

"""Dry run: compile a config's programs from abstract shapes and report memory.

`python -m train --config configs/<preset>.py --dry_run` validates the config,
builds the mesh, the model (`nnx.eval_shape`), the optimizer and the train
state as `jax.ShapeDtypeStruct`s carrying the run's shardings, and compiles
the train step (and the refresh program of the reparametrised layer modes)
exactly as `train.run` does. Nothing is allocated on the device and no data is
read: the vocabulary size comes from `data.tokenizer` (the SentencePiece file,
if given) or `data.vocab_size`. It prints the trainer's memory report and
writes `WORKDIR/memory.json`.

Peaks follow `train/memory.py`: argument + temp + output - alias, per device.
"""

import json
import os
import time
from typing import Any

import jax
import ml_collections
import subspax

from train import checkpoint as checkpoint_lib
from train import control_flow
from train import errors
from train import hf
from train import layerwise
from train import memory as memory_lib
from train import model as model_lib
from train import targets
from train import tokenizer as tokenizer_lib
from train import train as train_lib

MEMORY_FILE = "memory.json"


def vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  """The vocabulary size a run of `data_cfg` would have, reading no corpus.

  Raises:
    errors.MissingFileError: `data.tokenizer` names a file that does not exist
      (a FileNotFoundError and a UserError).
  """
  if not data_cfg.tokenizer:
    return data_cfg.vocab_size  # the BPE the trainer trains has exactly this size
  if not os.path.isfile(data_cfg.tokenizer):
    raise errors.MissingFileError(
        f"data.tokenizer: no such file {data_cfg.tokenizer!r}; give the path of a "
        'SentencePiece .model, or "" to size the vocabulary by data.vocab_size')
  return tokenizer_lib.load(data_cfg.tokenizer).vocab_size()


def _byte_fields(prefix: str, mem: dict[str, int]) -> dict[str, int]:
  return {f"{prefix}{k}_bytes": v for k, v in mem.items()}


def dry_run(cfg: ml_collections.ConfigDict, target: str = targets.LOCAL
            ) -> dict[str, Any]:
  """Compiles the programs of `cfg` from abstract shapes; allocates nothing.

  Examples:
    >>> from configs import test
    >>> report = dry_run(test.get_config())  # doctest: +SKIP
    >>> report["peak_bytes"] > report["state_bytes"]  # doctest: +SKIP
    True

  Args:
    cfg: A full trainer config (configs/base.py).
    target: What to compile for (`train.targets`): "" (the machine's
      devices), "cpu", or a GPU such as "h100" or "h100x8", compiled deviceless by
      XLA's GPU compiler.

  Returns:
    The memory record `run_dry` writes: `peak_bytes`, `argument_bytes`,
    `temp_bytes`, `output_bytes`, `alias_bytes` of the compiled train step
    (per device; for a subspax method, its ordinary step), the same with a
    `refresh_` prefix for the program of the refresh steps (the subspax
    methods' refresh step, or the reparametrised modes' refresh program), `state_bytes` and `param_bytes` (exact, global),
    `params`, `vocab_size`, the device kind and count, the mesh, the compile
    seconds and the config; `target` and `compiler`; `control_flow` (and
    `refresh_control_flow`): the conditionals each program executes per run
    and its while-loop trip counts (`train.control_flow.count`);
    `accumulator_bytes` (`{"reduced", "full"}`) for a layer-wise step with
    `grad_accum` > 1 (`layerwise.accumulator_bytes`).

  Raises:
    ValueError / FileNotFoundError: on bad input, as `train.run` would.
  """
  parsed = targets.parse(target)
  cfg = hf.configure(cfg)  # init_from: the Hugging Face checkpoint's model
  mesh, rules, tx = train_lib.check_and_mesh(cfg, targets.devices(parsed))
  vocab = hf.vocab_size(cfg, vocab_size(cfg.data))
  start = time.perf_counter()
  programs = train_lib.build_programs(cfg, vocab, tx)
  shardings = train_lib.train_state_shardings(programs, mesh, rules)
  with jax.set_mesh(mesh):
    state = checkpoint_lib.abstract(jax.eval_shape(programs.init), shardings)
    jitted = train_lib.jit_programs(programs, shardings, mesh, cfg)
    step = jitted.train_step.lower(state, jitted.batch).compile()
    # The reparametrised modes' refresh program, or the subspax methods'
    # refresh step: run once every opt.update_interval steps.
    refresh = next((f.lower(state, jitted.batch).compile()
                    for f in (jitted.refresh, jitted.refresh_step) if f is not None),
                   None)
  compile_s = time.perf_counter() - start
  device = mesh.devices.flat[0]
  record = {
      **_byte_fields("", memory_lib.compiled_memory(step)),
      "control_flow": control_flow.of_compiled(step),
      **({} if refresh is None else {
          **_byte_fields("refresh_", memory_lib.compiled_memory(refresh)),
          "refresh_control_flow": control_flow.of_compiled(refresh)}),
      **({} if not (cfg.opt.layerwise and cfg.grad_accum > 1) else {
          "accumulator_bytes": layerwise.accumulator_bytes(
              programs.graphdef, programs.tx, programs.param_shapes,
              state.opt_state)}),
      "state_bytes": subspax.state_bytes(state.opt_state),
      "param_bytes": subspax.state_bytes(state.params),
      "params": int(model_lib.count_params(programs.model_cfg)),
      "vocab_size": vocab,
      "target": parsed.name or device.platform,
      "compiler": targets.compiler_name(parsed, device),
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": mesh.size,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "compile_s": round(compile_s, 3),
      "jax_version": jax.__version__,
      "config": cfg.to_dict(),
  }
  return record


def program_sizes(record: dict[str, Any], prefix: str = "") -> dict[str, int] | None:
  """One program's sizes in a `dry_run` record (`prefix` "" for the train
  step, "refresh_" for the refresh program), or None if it has none."""
  if f"{prefix}peak_bytes" not in record:
    return None
  return {k: record[f"{prefix}{k}_bytes"] for k in (*memory_lib.SIZES, "peak")}


def run_sizes(record: dict[str, Any]) -> dict[str, int]:
  """The sizes of the program with the larger peak: a run's peak memory.

  A subspax method's run alternates an ordinary step and, every
  `opt.update_interval` steps, a refresh step; only one runs at a time, so
  the run needs the larger of the two peaks.

  Examples:
    >>> step = {f"{k}_bytes": 1 for k in ("argument", "temp", "output", "alias")}
    >>> record = {**step, "peak_bytes": 1, "refresh_peak_bytes": 2,
    ...           **{f"refresh_{k}": 2 for k in step}}
    >>> run_sizes(record)["peak"]
    2
  """
  programs = [program_sizes(record), program_sizes(record, "refresh_")]
  return max((p for p in programs if p), key=lambda p: p["peak"])


def report(record: dict[str, Any]) -> str:
  """The trainer's memory report for a `dry_run` record."""
  lines = [memory_lib.report(program_sizes(record), record["state_bytes"],
                             record["param_bytes"],
                             program_sizes(record, "refresh_"))]
  if "accumulator_bytes" in record:
    acc = record["accumulator_bytes"]
    lines.append(
        f"micro-batch accumulators (exact, global; in the train step's "
        f"temporaries): {memory_lib.mib(acc['reduced'] + acc['full'])}: reduced "
        f"gradients {memory_lib.mib(acc['reduced'])}, gradients of the "
        f"unprojected leaves {memory_lib.mib(acc['full'])}")
  if "control_flow" in record:
    lines.append("train step: " + control_flow.summary(record["control_flow"]))
  if "refresh_control_flow" in record:
    lines.append("refresh: " + control_flow.summary(record["refresh_control_flow"]))
  return "\n".join(lines)


def run_dry(cfg: ml_collections.ConfigDict, workdir: str,
            target: str = targets.LOCAL) -> dict[str, Any]:
  """`dry_run`, then prints the memory report and writes `workdir/memory.json`.

  Args:
    cfg: A full trainer config.
    workdir: Where memory.json goes (created if missing).
    target: What to compile for (see `dry_run`).

  Returns:
    The record written.
  """
  record = dry_run(cfg, target)
  if jax.process_index() == 0:
    print(f"dry run: {record['params']:,} params, vocab {record['vocab_size']}; "
          f"optimizer {cfg.opt.name}; mesh {record['mesh']} of "
          f"{record['device_kind']}; {record['compiler']}; compiled in "
          f"{record['compile_s']:.1f} s", flush=True)
    print(report(record), flush=True)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, MEMORY_FILE)
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {path}", flush=True)
  return record

"""`python -m train --dry_run`: the train step compiled from abstract shapes.

The dry run must report the memory the trainer reports for the same config,
allocate nothing (no parameters, no optimizer state) and read no data.
"""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

import helpers
from train import dry_run
from train import errors
from train import tokenizer
from train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_bytes(text: str, line_start: str, field: str) -> int:
  """The `(N bytes)` after `field` on the line that starts with `line_start`."""
  line = next(l for l in text.splitlines() if l.startswith(line_start))
  return int(re.search(rf"{field} [\d.,]+ MiB \(([\d,]+) bytes\)", line)
             .group(1).replace(",", ""))


@pytest.mark.slow
def test_dry_run_peak_is_the_trainers_printed_peak(corpus, tmp_path, capsys):
  # The dry run is pointed at data that does not exist: it must not read it.
  missing = {"data.files": str(tmp_path / "no_such.txt"),
             "data.dir": str(tmp_path / "no_cache")}
  proc = subprocess.run(
      [sys.executable, "-m", "train", "--config", "configs/test.py",
       f"--workdir={tmp_path / 'dry'}", "--config.opt.name=adamw", "--dry_run",
       *(f"--config.{k}={v}" for k, v in missing.items())],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert not os.path.exists(tmp_path / "no_cache")
  with open(tmp_path / "dry" / "memory.json") as f:
    record = json.load(f)
  assert printed_bytes(proc.stdout, "train step memory", "peak") == record["peak_bytes"]
  assert record["peak_bytes"] == (record["argument_bytes"] + record["temp_bytes"]
                                  + record["output_bytes"] - record["alias_bytes"])
  assert record["device_kind"] and record["config"]["opt"]["name"] == "adamw"
  assert record["vocab_size"] == 320 and record["param_bytes"] == 4 * record["params"]

  train.run(helpers.make_config(corpus, steps=1, opt__name="adamw"),
            str(tmp_path / "run"))
  printed = capsys.readouterr().out
  assert "vocab 320" in printed
  assert printed_bytes(printed, "train step memory", "peak") == record["peak_bytes"]
  assert printed_bytes(printed, "exact", "optimizer state") == record["state_bytes"]


@pytest.mark.slow
def test_dry_run_allocates_nothing_even_for_a_model_beyond_host_memory():
  # ~100 GB of float32 weights (24 layers of d_model 8192, d_ff 32768), in the
  # RSO reparametrised mode so that the refresh program is compiled as well.
  cfg = helpers.make_config({}, model__d_model=8192, model__d_ff=32768,
                            model__n_layers=24, model__n_heads=8,
                            opt__name="rso", opt__subspace_layers=True)
  before = {id(x) for x in jax.live_arrays()}
  record = dry_run.dry_run(cfg)
  assert {id(x) for x in jax.live_arrays()} <= before
  assert record["param_bytes"] > 100e9
  assert record["peak_bytes"] > record["param_bytes"]
  assert record["refresh_peak_bytes"] > 0
  assert dry_run.report(record).splitlines()[1].startswith("refresh memory")


def test_vocab_size_comes_from_the_config_or_the_tokenizer_file(tmp_path):
  cfg = helpers.make_config({})
  assert dry_run.vocab_size(cfg.data) == 320
  lines = [f"line {i} of the {w} text" for i in range(300)
           for w in ("sweet", "king", "night")]
  (tmp_path / "own.model").write_bytes(tokenizer.train_bpe(lines, 300))
  cfg.data.tokenizer = str(tmp_path / "own.model")
  assert dry_run.vocab_size(cfg.data) == 300
  cfg.data.tokenizer = str(tmp_path / "missing.model")
  with pytest.raises(errors.UserError, match="^data.tokenizer: no such file"):
    dry_run.vocab_size(cfg.data)


@pytest.mark.slow
@pytest.mark.parametrize("preset, target, budget_gib", [
    ("llama_7b_24gb", "h100", 22), ("llama_7b_2k_24gb", "h100", 22),
    ("llama_13b_40gb", "h100", 38), ("llama_70b_8x80gb", "h100x8", 60),
    ("llama_7b_12gb", "h100", 11), ("llama_13b_24gb", "h100", 22),
    ("llama_7b_16gb", "h100", 14)])
def test_the_presets_fit_their_budget(preset, target, budget_gib):
  """Every program's peak per device, compiled for H100s by XLA's GPU
  compiler, leaves room for the runtime on a card of the size in the name:
  llama_7b_24gb.py (32 x 16 x 256 tokens) and llama_13b_40gb.py
  (128 x 4 x 256), micro-batches accumulated layer-wise; llama_7b_2k_24gb.py
  (2 x 2048), the int8 presets (16 x 256), and llama_70b_8x80gb.py (8 x 4096)
  within 60 GiB of each of eight 80 GB cards."""
  import importlib  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"configs.{preset}").get_config()
  record = dry_run.dry_run(cfg, target)
  assert record["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert record["device_count"] == (8 if target.endswith("x8") else 1)
  peaks = [record["peak_bytes"], record.get("refresh_peak_bytes", 0)]
  assert max(peaks) <= budget_gib * 2**30, [p / 2**30 for p in peaks]
  if cfg.model.kernel_format == "int8":
    # int8 kernels (and 4 bytes per 256 of them), the rest bfloat16.
    assert record["param_bytes"] < 1.1 * record["params"]
  else:
    # bfloat16 weights (plus, for GRASS's subspace layers, deltas and rows).
    assert record["param_bytes"] < 2.25 * record["params"]


@pytest.mark.slow
def test_subspace_and_clipped_train_steps_need_no_more_temporaries_than_adamw():
  """The projected gradients are overwritten in place by the update; the
  gradient-norm metric must read them first rather than keep copies
  (`train._after_norm`). With copies, this shape (16 stacked layers, weights
  far larger than the activations) took 8% (GaLore) to 15% (APOLLO) more
  temporaries than AdamW. `opt.clip_norm` must not add a copy either."""
  temps = {}
  for name, clip in (("adamw", 0.0), ("galore", 0.0), ("grass", 0.0),
                     ("apollo", 0.0), ("adamw", 1.0), ("galore", 1.0)):
    cfg = helpers.make_config({}, model__d_model=256, model__d_ff=768,
                              model__n_layers=16, model__n_heads=4, opt__name=name,
                              opt__rank=32, batch_size=1, seq_len=8, mesh__data=1,
                              opt__clip_norm=clip)
    temps[name, clip] = dry_run.dry_run(cfg)["temp_bytes"]
  # Clipping (subspax.clip_by_global_norm) keeps no copy either; optax's
  # divide-per-element clip took AdamW to +77% and GaLore to +16% here.
  for case, temp in temps.items():
    assert temp <= 1.01 * temps["adamw", 0.0], {k: v / 2**20 for k, v in temps.items()}

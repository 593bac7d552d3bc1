"""Benchmarks record what is needed to rerun them (bench._common.call_record).

The long benchmarks are not run here: the convergence script runs with its
training run replaced by a stub, single_matrix on an 8 x 8 weight, step_time
--against on the tiny preset at batch 1.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import optax
import pytest

import subspax
from bench import _common
from bench import convergence
from bench import precision
from bench import readme
from bench import single_matrix


def _assert_rerunnable(record, command_start):
  assert record["command"].startswith(command_start), record["command"]
  machine = record["machine"]
  for field in ("date", "cpu", "cpu_count", "device_kind", "versions"):
    assert machine[field], field
  assert {"jax", "flax", "optax", "python"} <= set(machine["versions"])
  text = json.dumps(record)
  assert _common.ROOT not in text and tempfile.gettempdir() not in text


def test_call_record_holds_command_args_facts_and_machine_with_portable_paths():
  args = argparse.Namespace(steps=2, out=_common.RESULTS,
                            workdir=os.path.join(tempfile.gettempdir(), "w"))
  record = _common.call_record(args, ["--steps", "2", "--out", _common.RESULTS],
                               batch=8, seq_len=256)
  _assert_rerunnable(record, "python -m bench")
  assert record["command"].endswith("--steps 2 --out ./bench/results")
  assert record["args"] == {"steps": 2, "out": "./bench/results",
                            "workdir": "$TMPDIR/w"}
  assert (record["batch"], record["seq_len"]) == (8, 256)


def test_with_call_appends_to_the_earlier_calls():
  first = _common.with_call({"runs": [1]}, None, {"command": "a"})
  second = _common.with_call({"runs": [1, 2]}, first, {"command": "b"})
  assert [c["command"] for c in second["calls"]] == ["a", "b"]
  assert second["runs"] == [1, 2]


def _fake_run(method, lr, args, seed=None):
  """A run record as `convergence.run_one` writes it, without training: the
  loss falls with the lr, rises with the seed, and the split row is lower."""
  cfg = convergence.make_config(method, lr, args, seed)
  tokens = cfg.batch_size * cfg.seq_len
  loss = 6.0 - lr + 0.01 * cfg.seed - 0.1 * (cfg.opt.block_lr_scale != 1)
  return {"method": method, "lr": lr, "seed": cfg.seed, "steps": cfg.steps,
          "tokens": cfg.steps * tokens, "eval": [(tokens * cfg.steps, loss)],
          "train_loss": [(tokens, 6.5)], "final_eval_loss": loss,
          "state_bytes": 1000, "wall_s": 60.0, "step_time_s_sum": 1.0,
          "rank": cfg.opt.rank, "update_interval": cfg.opt.update_interval,
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          **({"block_lr_scale": cfg.opt.block_lr_scale}
             if cfg.opt.block_lr_scale != 1 else {})}


def test_convergence_resume_keeps_every_call_and_names_it_in_each_run(tmp_path):
  common = ["--name", "conv", "--steps", "4", "--seq-len", "32",
            "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]
  with mock.patch.object(convergence, "run_one", _fake_run):
    convergence.main(common + ["--methods", "adamw,subtrack", "--lrs", "3e-3"])
    convergence.main(common + ["--resume", "--methods", "adamw",
                               "--lrs", "1e-3"])
  payload = json.loads((tmp_path / "conv.json").read_text())
  calls = payload["calls"]
  assert len(calls) == 2
  assert calls[0]["args"]["methods"] == "adamw,subtrack"
  assert calls[1]["args"]["lrs"] == "1e-3" and calls[1]["args"]["resume"]
  for call in calls:
    _assert_rerunnable(call, "python -m bench")
    assert (call["batch"], call["seq_len"]) == (8, 32)
    assert "--seq-len 32" in call["command"]
  assert [(r["method"], r["lr"], r["call"]) for r in payload["runs"]] == [
      ("adamw", 3e-3, 0), ("subtrack", 3e-3, 0), ("adamw", 1e-3, 1)]


def test_convergence_committed_tables_are_what_report_gives():
  """The seeds and sweeps options leave the one-seed tables as they were."""
  for name in ("convergence", "convergence_long", "baseline"):
    payload = _common.load_json(os.path.join(_common.RESULTS, f"{name}.json"))
    assert convergence.is_baseline(payload) == (name == "baseline")
    with open(os.path.join(_common.RESULTS, f"{name}.md")) as f:
      assert convergence.report(payload, 3e-3).strip() == f.read().strip()


def test_convergence_seeds_sweeps_and_the_split_row(tmp_path):
  """--sweep gives a method its own lrs, adamw_split is AdamW with the preset
  method's scale on the blocks' kernels, a further seed reruns each method at
  its best lr of the first seed, --resume runs nothing twice, and the report
  holds the sweep and the seeds with their spread."""
  command = ["--name", "base", "--steps", "4", "--seq-len", "32", "--eval-every",
             "0", "--out", str(tmp_path), "--workdir", str(tmp_path / "w"),
             "--methods", "adamw,adamw_split,subtrack", "--lrs", "3e-3",
             "--sweep", "adamw=1e-3,3e-3,1e-2", "--sweep", "adamw_split=3e-3,1e-2",
             "--seeds", "0,1"]
  fake = mock.Mock(side_effect=_fake_run)
  with mock.patch.object(convergence, "run_one", fake):
    convergence.main(command)
    assert fake.call_count == 9
    convergence.main(command + ["--resume"])
    assert fake.call_count == 9  # everything was there
  payload = json.loads((tmp_path / "base.json").read_text())
  assert sorted((r["method"], r["lr"], r["seed"]) for r in payload["runs"]) == [
      ("adamw", 1e-3, 0), ("adamw", 3e-3, 0), ("adamw", 1e-2, 0), ("adamw", 1e-2, 1),
      ("adamw_split", 3e-3, 0), ("adamw_split", 1e-2, 0), ("adamw_split", 1e-2, 1),
      ("subtrack", 3e-3, 0), ("subtrack", 3e-3, 1)]
  split = convergence.make_config("adamw_split", 1e-2, argparse.Namespace(
      **payload["args"]))
  assert (split.opt.name, split.opt.block_lr_scale) == ("adamw", 0.25)
  rows = {r["method"]: r for r in convergence.seed_rows(payload)}
  assert rows["subtrack"]["tuned"] == "adamw_split"
  assert rows["adamw_split"]["losses"] == pytest.approx({0: 5.89, 1: 5.9})
  assert rows["subtrack"]["per_seed"] == pytest.approx(
      {0: 5.997 / 5.89, 1: 6.007 / 5.9})
  table = (tmp_path / "base.md").read_text()
  assert "| adamw | 5.999 | 5.997 | **5.990** |\n" in table  # lrs 1e-3 .. 1e-2
  assert "| subtrack | 0.003 | 5.997 | 6.007 | 6.002 | 5.997-6.007 | 1.018 " \
      "(1.018-1.018) |" in table
  assert "9 runs, 9 min of wall time in all." in table
  assert (tmp_path / "base.png").exists()


def test_convergence_reuse_takes_over_runs_of_the_same_setting(tmp_path):
  common = ["--steps", "4", "--seq-len", "32", "--eval-every", "0",
            "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]
  with mock.patch.object(convergence, "run_one", _fake_run):
    convergence.main(common + ["--name", "old", "--methods", "adamw",
                               "--lrs", "1e-3,3e-3"])
  fake = mock.Mock(side_effect=_fake_run)
  with mock.patch.object(convergence, "run_one", fake):
    convergence.main(common + ["--name", "new", "--methods", "adamw",
                               "--lrs", "3e-3,1e-2", "--reuse", "old"])
    convergence.main(common + ["--name", "other", "--methods", "adamw",
                               "--lrs", "3e-3", "--seed", "1", "--reuse", "old"])
  assert [c.args[1:2] + (c.args[3],) for c in fake.call_args_list] == [
      (1e-2, 0), (3e-3, 1)]  # another seed is not the same setting
  payload = json.loads((tmp_path / "new.json").read_text())
  reused, fresh = payload["runs"]
  assert (reused["lr"], reused["reused_from"], fresh["lr"]) == (3e-3, "old", 1e-2)
  assert "reused_from" not in fresh and fresh["call"] == 0
  assert payload["calls"][reused["call"]]["reused_from"] == "old"
  assert payload["calls"][reused["call"]]["args"]["name"] == "old"
  with mock.patch.object(convergence, "run_one", _fake_run):
    convergence.main(common + ["--name", "new", "--methods", "adamw",
                               "--lrs", "1e-3", "--reuse", "old", "--resume"])
  again = json.loads((tmp_path / "new.json").read_text())
  assert [c.get("reused_from") for c in again["calls"]] == [None, "old", None]
  assert again["runs"][2]["call"] == reused["call"]  # old's call, copied once
  with pytest.raises(SystemExit, match="no .*missing.json"):
    convergence.main(common + ["--name", "x", "--reuse", "missing"])


def test_single_matrix_json_records_its_call(tmp_path):
  txs = {"optax.adam": optax.adam(1e-3),
         "grassjump": subspax.grassjump(1e-3, rank=2, update_interval=200)}
  with mock.patch.object(single_matrix, "optimizers", lambda rank: txs):
    single_matrix.main(["--m", "8", "--n", "8", "--rank", "2",
                        "--out", str(tmp_path)])
  payload = json.loads((tmp_path / "single_matrix.json").read_text())
  assert set(payload["results"]) == set(txs)
  (call,) = payload["calls"]
  _assert_rerunnable(call, "python -m bench")
  assert call["args"]["m"] == 8 and call["batch"] is None


def test_committed_results_record_their_calls():
  for name in ("convergence", "convergence_long", "baseline", "single_matrix",
               "precision"):
    with open(os.path.join(_common.RESULTS, f"{name}.json")) as f:
      payload = json.load(f)
    assert payload["calls"], name
    module = ("bench.convergence" if name in ("convergence_long", "baseline")
              else f"bench.{name}")
    for call in payload["calls"]:
      assert call["command"].startswith(f"python -m {module}")
      assert "batch" in call and "seq_len" in call and call["machine"]
    runs = payload.get("runs", [])
    assert all(r["call"] < len(payload["calls"]) and r["batch_size"]
               for r in runs), name


def test_precision_reports_each_variant_against_float32(tmp_path):
  def fake_run(cfg, workdir):
    loss = {"float32": 5.0, "bfloat16": 5.02}[cfg.model.param_dtype]
    loss += 0.3 * (cfg.opt.stochastic_rounding is False)
    return {"steps": cfg.steps, "tokens": cfg.steps * 1024,
            "eval": [(1024, loss)], "train_loss": [(1024, loss)],
            "final_eval_loss": loss, "state_bytes": 1000, "wall_s": 1.0,
            "step_time_s_sum": 1.0, "rank": cfg.opt.rank,
            "update_interval": cfg.opt.update_interval,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len}

  with mock.patch.object(convergence, "run_config", fake_run):
    precision.main(["--steps", "4", "--out", str(tmp_path),
                    "--variants", "float32,bf16_sr,bf16_rn",
                    "--workdir", str(tmp_path / "w")])
  payload = json.loads((tmp_path / "precision.json").read_text())
  (call,) = payload["calls"]
  _assert_rerunnable(call, "python -m bench")
  assert [r["variant"] for r in payload["runs"]] == ["float32", "bf16_sr", "bf16_rn"]
  table = (tmp_path / "precision.md").read_text()
  assert "| bf16_sr | bfloat16 | stochastic | float32 | 5.0200 | 1.0040 |" in table
  assert "| bf16_rn | bfloat16 | to nearest | float32 | 5.3200 | 1.0640 |" in table


@pytest.mark.slow
def test_step_time_against_a_revision_times_both_trees_in_the_same_rounds(tmp_path):
  if not os.path.isdir(os.path.join(_common.ROOT, ".git")):
    pytest.skip("needs the git history of a checkout")
  proc = subprocess.run(
      [sys.executable, "-m", "bench.step_time", "--against", "HEAD", "--presets",
       "tiny", "--methods", "adamw,galore", "--repeats", "2", "--batch", "1",
       "--out", str(tmp_path)],
      cwd=_common.ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(tmp_path / "step_time_against.json") as f:
    payload = json.load(f)
  result, = payload["results"]
  assert result["against"] == "HEAD" and result["batch"] == 1
  assert set(result["seconds"]) == {
      f"{side}:{case}" for side in ("this", "base")
      for case in ("adamw/plain", "galore/plain", "galore/refresh")}
  assert all(len(s["all"]) == 2 for s in result["seconds"].values())
  for name in ("adamw", "galore"):
    assert len(result["vs_base"][name]["plain"]["ratios"]) == 2
    assert result["plain_vs_adamw"][name]["base"] > 0
  _assert_rerunnable(payload["calls"][-1], "python -m bench.step_time --against HEAD")
  assert "against revision `HEAD`" in (tmp_path / "step_time_against.md").read_text()

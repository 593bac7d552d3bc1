"""bench.readme: the results page and the README's summary come from bench/results."""

import json
import os

import pytest

from bench import readme


def _runs(*entries):
  return {"args": {"default_lr": 3e-3},
          "runs": [{"method": m, "lr": lr, "final_eval_loss": loss}
                   for m, lr, loss in entries]}


def test_eval_loss_ratios_of_a_sweep_and_of_a_long_run():
  result = _runs(("adamw", 3e-3, 5.0), ("adamw", 1e-3, 4.0),
                 ("subtrack", 3e-3, 4.5), ("subtrack", 1e-2, 4.2))
  # The sweep: preset lr vs AdamW's preset lr, then best vs AdamW's best.
  assert readme.eval_loss_ratios(result, "subtrack", sweep=True) == [0.9, 4.2 / 4.0]
  # A long run: the preset lr against AdamW's best lr.
  assert readme.eval_loss_ratios(result, "subtrack", sweep=False) == [4.5 / 4.0]
  assert readme.eval_loss_ratios(result, "grass", sweep=False) == []
  assert readme.eval_loss_ratios(None, "subtrack", sweep=True) == []


def _baseline(losses):
  """A baseline result: (method, lr, seed) -> final eval loss."""
  return {"args": {"seeds": "0,1", "default_lr": 3e-3},
          "methods": list(dict.fromkeys(m for m, _, _ in losses)),
          "runs": [{"method": m, "lr": lr, "seed": seed, "final_eval_loss": loss}
                   for (m, lr, seed), loss in losses.items()]}


@pytest.mark.parametrize("subtrack, words", [
    ((4.8, 4.9), "at this scale `subtrack` beats the tuned AdamW at every seed"),
    ((5.2, 5.3), "at this scale the tuned AdamW wins: no subspax method measured "
     "(`subtrack`) beats it"),
])
def test_the_baseline_verdict_compares_with_the_best_adamw_row(subtrack, words):
  result = _baseline({("adamw", 1e-3, 0): 5.1, ("adamw", 3e-3, 0): 5.2,
                      ("adamw_split", 3e-3, 0): 5.0, ("adamw", 1e-3, 1): 5.2,
                      ("adamw_split", 3e-3, 1): 5.1,
                      ("subtrack", 3e-3, 0): subtrack[0],
                      ("subtrack", 3e-3, 1): subtrack[1]})
  assert readme.tuned_adamw(result) == (
      5.0, "2 learning rates, and 1 with the subspax methods' per-group "
      "learning rates")
  text = readme.baseline_verdict(result)
  assert words in text
  assert text.startswith("Against a tuned AdamW (`adamw_split` at lr 0.003, "
                         "5.050 mean final eval loss over seeds 0, 1), the best "
                         f"subspax method, `subtrack` at lr 0.003, reaches "
                         f"{sum(subtrack) / 2:.3f}")
  # The long run's ratio is then to the tuned AdamW's loss; its other methods
  # are compared at the sweep seed.
  long = _runs(("adamw", 3e-3, 5.3), ("adamw", 1e-3, 5.1), ("subtrack", 3e-3, 4.5),
               ("grass", 3e-3, 5.1), ("rso", 3e-3, 4.9), ("fira", 3e-3, 4.8))
  assert readme.baseline_verdict(result, long).endswith(
      "Of the other methods of the 400-step run (seed 0, the preset lr only), "
      "`grass` ends at or above it (1.020x); the other 2 below it "
      "(0.960-0.980x). Measured on a 2-core CPU (tiny preset, 400 steps of "
      "8 x 128 tokens) with `python -m bench.convergence --name baseline ...` "
      "([the commands](docs/results.md#convergence-against-a-tuned-adamw)).")
  assert readme.eval_loss_ratios(long, "subtrack", sweep=False,
                                 reference=readme.tuned_adamw(result)) == [0.9]


def test_splice_replaces_only_the_text_between_each_pair_of_markers():
  text = ("a\n<!-- bench:summary -->\nold\n<!-- /bench:summary -->\n"
          "<!-- bench:gpu -->\nkept\n<!-- /bench:gpu -->\n")
  out = readme.splice(text, {"summary": "new table"})
  assert "new table" in out and "old" not in out and "kept" in out
  with pytest.raises(ValueError, match="no <!-- bench:summary -->"):
    readme.splice("no markers\n", {"summary": "new table"})


def test_the_presets_table_shows_each_peak_per_device_beside_adamw(tmp_path):
  sizes = lambda gib: {"peak": gib * 2**30, "temp": 0}
  presets = {"llama_70b_8x80gb": {
      "step": sizes(36.5), "refresh": sizes(36.9), "adamw": sizes(147.5),
      "devices": 8, "params": 69e9, "method": "subtrack", "rank": 2048,
      "batch": 8, "seq": 4096}}
  (tmp_path / "memory_h100.json").write_text(json.dumps({"presets": presets}))
  table = readme.presets_summary(str(tmp_path))
  assert ("| [`llama_70b_8x80gb`](configs/llama_70b_8x80gb.py) | 69.0B | "
          "subtrack r2048 | 8 x 4096 | 8 x H100 | 36.9 GiB | 147.5 GiB |") in table


def test_the_published_figures_sit_beside_the_presets_compiled_peaks(tmp_path):
  sizes = lambda gib: {"peak": gib * 2**30, "temp": 0}
  presets = {"llama_7b_12gb": {
      "step": sizes(10.0), "refresh": sizes(10.5), "devices": 1,
      "params": 6.7e9, "method": "apollo_mini", "rank": 1024, "batch": 16,
      "seq": 256, "grad_accum": 1}}
  (tmp_path / "memory_h100.json").write_text(json.dumps({"presets": presets}))
  lines = readme.published_table(str(tmp_path)).splitlines()
  row = next(l for l in lines if "llama_7b_12gb" in l)
  assert row.startswith("| [APOLLO-Mini](https://arxiv.org/abs/2412.05270): "
                        "LLaMA-7B in 12 GB |")
  # The preset's setting from its record and its config, the larger peak.
  assert ("| apollo_mini r1, 16 x 256 tokens per step, int8 kernels, bf16 "
          "rest, bf16 moments, layer-wise, activation checkpointing | "
          "10.5 GiB |") in row
  # A preset the results do not hold: no figure.
  assert next(l for l in lines if "llama_7b_16gb" in l).endswith("| - |")
  assert next(l for l in lines if "llama_13b_24gb" in l).startswith("| (as above) |")
  assert "how the paper got it" not in lines[0]
  detail = readme.published_table(str(tmp_path), detail=True)
  assert "how the paper got it" in detail
  assert "[`llama_7b_12gb`](../configs/llama_7b_12gb.py)" in detail  # from docs/


@pytest.mark.parametrize("record,expected", [
    ({"machine": {"device_kind": "cpu"}}, "XLA CPU compiler"),
    ({"machine": {"cpu": "AMD EPYC"}}, "XLA CPU compiler"),  # older records
    ({"machine": {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu"}},
     "XLA GPU compiler on NVIDIA H100 80GB HBM3"),
    ({"platform": "gpu", "target": "NVIDIA H100", "machine": {"device_kind": "cpu"}},
     "XLA GPU compiler for NVIDIA H100 (compiled without the device)"),
])
def test_each_table_names_the_compiler_its_record_gives(record, expected):
  assert readme.compiler(record) == expected


def test_the_page_states_machine_and_command_but_no_dates():
  record = {"calls": [{"command": "python -m bench.memory --sizes 60m",
                       "machine": {"cpu": "Xeon", "cpu_count": 2,
                                   "date": "2026-01-01 00:00 UTC",
                                   "versions": {"jax": "0.10.2"}}}]}
  text = readme.provenance(record, "memory")
  assert "Xeon (2 cores, jax 0.10.2)" in text and "XLA CPU compiler" in text
  assert ".venv/bin/python -m bench.memory --sizes 60m" in text
  assert "2026" not in text
  table = "**60m** (rank 128; measured 2026-12-02 12:43 UTC)\n\n|a|\n\nMachine: x; 2026."
  assert readme.clean(table) == "**60m** (rank 128)\n\n|a|"


def test_docs_results_and_readme_summary_are_up_to_date():
  """What `python -m bench.readme --check` checks: the committed pages are
  what the committed results give (regenerate with `python -m bench.readme`)."""
  with open(os.path.join(readme.ROOT, "README.md")) as f:
    readme_text = f.read()
  page, readme_new = readme.render(readme._common.RESULTS, readme_text)  # pylint: disable=protected-access
  with open(os.path.join(readme.ROOT, "docs", "results.md")) as f:
    assert f.read() == page, "docs/results.md is stale: python -m bench.readme"
  assert readme_new == readme_text, "README.md is stale: python -m bench.readme"


def test_a_presets_setting_names_how_it_stores_weights_moments_and_bases():
  assert readme.preset_setting("llama_7b_16gb") == (
      "int8 kernels, bf16 rest, 8-bit moments, int8 bases, layer-wise, "
      "activation checkpointing")
  assert "bases" not in readme.preset_setting("llama_7b_12gb")  # APOLLO-Mini

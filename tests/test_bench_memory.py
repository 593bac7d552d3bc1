"""bench.memory's "what fits" search and --merge, and the table bench.readme
renders from them; compiles are replaced by known peaks, so nothing compiles."""

import argparse
import json

import pytest

from bench import _common
from bench import memory
from bench import readme

GIB = 2**30
# Peaks (GiB) that grow with the preset, as compiled peaks do.
PEAKS = {"adamw": dict(zip(memory.SIZES, (1, 2, 6, 20, 100, 200))),
         "subtrack": dict(zip(memory.SIZES, (1, 2, 5, 15, 70, 130)))}


@pytest.fixture
def compiles(monkeypatch):
  """Replaces compile_case by PEAKS; returns the list of cases compiled."""
  done = []

  def fake(size, scan, name, args, variant="plain"):
    del variant
    done.append((size, scan, name))
    return {"state_bytes": 1, "projected_state_bytes": 1, "compile_s": 0.0,
            "compiled": {"peak": PEAKS[name][size] * GIB, "temp": 0}}

  monkeypatch.setattr(memory, "compile_case", fake)
  return done


def args(**kw):
  return argparse.Namespace(**{"batch": 1, "seq": 256, **kw})


def test_what_fits_finds_the_largest_preset_and_compiles_only_what_it_needs(
    compiles, tmp_path):
  partial = _common.Partial(str(tmp_path), "memory")
  fits = memory.what_fits([24, 40, 80], ["adamw", "subtrack"], args(), partial)
  assert fits["largest"] == {"adamw": {"24": "1b", "40": "1b", "80": "1b"},
                             "subtrack": {"24": "1b", "40": "1b", "80": "7b"}}
  # From 13B down to the first preset that fits 24 GiB; each compiled once.
  assert sorted(compiles) == sorted(
      (s, True, n) for n in ("adamw", "subtrack") for s in ("13b", "7b", "1b"))
  assert fits["peaks"]["subtrack"] == {"1b": 15 * GIB, "7b": 70 * GIB,
                                       "13b": 130 * GIB}
  # A second search reuses the cache, and so does a resumed run.
  memory.what_fits([24], ["adamw"], args(), partial)
  assert len(compiles) == 6
  assert memory.what_fits([0.5], ["adamw"], args(), partial
                          )["largest"]["adamw"] == {"0.5": None}
  compiled = len(compiles)
  resumed = _common.Partial(str(tmp_path), "memory", resume=True)
  assert resumed.reused == set(partial.cases)
  memory.what_fits([24, 40, 80], ["adamw", "subtrack"], args(), resumed)
  assert len(compiles) == compiled
  resumed.remove()
  assert _common.Partial(str(tmp_path), "memory", resume=True).cases == {}


def test_merge_keeps_other_sizes_in_order_and_refuses_another_batch():
  earlier = {"args": {"batch": 1, "seq": 256}, "machine": {"date": "then"},
             "fits": {"old": True},
             "results": [{"size": "60m", "scan": False},
                         {"size": "7b", "scan": True, "measured": "old"}]}
  now = [{"size": "7b", "scan": True, "measured": "now"},
         {"size": "1b", "scan": True, "measured": "now"}]
  results, fits = memory.merge(earlier, now, None, args())
  assert [(r["size"], r["measured"]) for r in results] == [
      ("60m", "then"), ("1b", "now"), ("7b", "now")]
  assert fits == {"old": True}
  assert memory.merge(earlier, now, {"new": True}, args())[1] == {"new": True}
  with pytest.raises(ValueError, match="--batch"):
    memory.merge(earlier, now, None, args(batch=8))


def test_merged_fits_keep_the_rows_not_compiled_again():
  table = lambda rows, variants: {
      "budgets_gib": [24], "sizes": ["1b"], "variants": variants,
      "peaks": {r: {"1b": v} for r, v in rows.items()},
      "largest": {r: {"24": "1b"} for r in rows}}
  earlier = table({"adamw": 1, "adamw+layerwise": 2}, {"plain": {}, "layerwise": {}})
  fits = memory.merge_fits(earlier, table({"adamw+layerwise": 3}, {"layerwise": {}}))
  assert fits["peaks"] == {"adamw": {"1b": 1}, "adamw+layerwise": {"1b": 3}}
  assert list(fits["variants"]) == ["plain", "layerwise"]


def test_merged_fits_take_the_union_of_the_budgets():
  table = lambda rows, budgets: {
      "budgets_gib": budgets, "sizes": ["1b", "7b"], "variants": {},
      "peaks": {r: {"7b": 20 * GIB} for r in rows},
      "largest": {r: {str(b): "7b" for b in budgets} for r in rows}}
  fits = memory.merge_fits(table(["adamw"], [24, 40]),
                           table(["subtrack+layerwise+int8"], [12, 24]))
  assert fits["budgets_gib"] == [12, 24, 40]
  # Each row keeps the budgets it was searched at, nothing more.
  assert fits["largest"] == {"adamw": {"24": "7b", "40": "7b"},
                             "subtrack+layerwise+int8": {"12": "7b", "24": "7b"}}
  # Other sizes: the rows cannot share a table, this run's replace them.
  other = dict(table(["grass"], [12]), sizes=["7b"])
  assert memory.merge_fits(table(["adamw"], [24]), other) == other


@pytest.mark.parametrize("method", ["subtrack", "apollo_mini", "grass"])
def test_the_int8_variant_is_the_presets_memory_saving_precision(method):
  from configs import base  # pylint: disable=import-outside-toplevel
  variant = base.get_base_config()
  variant.opt.name = method
  variant.update_from_flattened_dict(
      memory.variant_overrides("layerwise+int8", method))
  expected = base.get_base_config()
  expected.opt.name = method
  base.memory_saving(expected).model.kernel_format = "int8"
  assert variant.to_dict() == expected.to_dict()
  # AdamW has no method section (so no 8-bit moments) and no basis.
  adamw = memory.variant_overrides("layerwise+int8", "adamw")
  assert adamw["opt.basis_dtype"] == "float32"
  assert not any("quantize_moments" in key for key in adamw)


def test_readme_renders_the_fits_table(compiles, tmp_path):
  fits = memory.what_fits([24, 80], ["adamw", "subtrack"], args(),
                          _common.Partial(str(tmp_path), "memory"))
  with open(tmp_path / "memory.json", "w") as f:
    json.dump({"fits": fits}, f)
  lines = readme.fits_table(str(tmp_path)).splitlines()
  assert "| adamw | 1B (20.0) | 1B (20.0) |" in lines
  assert "| subtrack | 1B (15.0) | 7B (70.0) |" in lines
  assert "| subtrack | - | - | - | 15.0 | 70.0 | 130.0 |" in lines
  assert "not searched" not in lines[0]
  assert readme.fits_table(str(tmp_path / "none")) is None
  # A row merged from a run at other budgets: '-' where it was not searched,
  # 'none' where nothing fits.
  fits = memory.merge_fits(fits, memory.what_fits(
      [0.5, 24], ["subtrack"], args(), _common.Partial(str(tmp_path), "memory"),
      ("layerwise+int8",)))
  with open(tmp_path / "memory.json", "w") as f:
    json.dump({"fits": fits}, f)
  lines = readme.fits_table(str(tmp_path)).splitlines()
  assert "| adamw | - | 1B (20.0) | 1B (20.0) |" in lines
  assert "| subtrack+layerwise+int8 | none | 1B (15.0) | - |" in lines
  assert "'-': the row was not searched at that budget." in lines[0]
  assert "`+layerwise+int8`: layer-wise in the memory-saving precision" in lines[0]


def test_presets_compile_for_their_own_mesh_beside_adamw(monkeypatch, tmp_path):
  calls = []

  def fake_dry_run(cfg, target):
    calls.append((cfg.opt.name, cfg.opt.layerwise, cfg.model.param_dtype, target))
    sizes = {"peak_bytes": GIB, "argument_bytes": 0, "temp_bytes": GIB,
             "output_bytes": 0, "alias_bytes": 0}
    return {**sizes, "state_bytes": 1, "param_bytes": 2, "params": 3,
            "compile_s": 0.0}

  monkeypatch.setattr(memory.dry_run, "dry_run", fake_dry_run)
  partial = _common.Partial(str(tmp_path), "memory")
  out = memory.dry_run_presets(["llama_7b_24gb", "llama_70b_8x80gb"], partial, "h100")
  assert calls == [("subtrack", True, "bfloat16", "h100"),
                   ("adamw", False, "float32", "h100"),
                   ("subtrack", True, "bfloat16", "h100x8"),
                   ("adamw", False, "float32", "h100x8")]
  assert [out[n]["devices"] for n in out] == [1, 8]
  assert "| `configs/llama_70b_8x80gb.py` | subtrack r2048 | 0.0B | 8 | 8 x 4096 |" \
      in memory.presets_table(out)
  # Without a GPU target the 8-device preset is skipped, not compiled for one CPU.
  calls.clear()
  assert list(memory.dry_run_presets(["llama_70b_8x80gb"], partial, "")) == []
  assert calls == []

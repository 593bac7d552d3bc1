"""bench.readme: the targets summary computes its ratios from the result files."""

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


def test_verdicts_count_the_cases_that_meet_a_target():
  assert readme.verdict([0.3, 0.34], lambda v: v <= 0.35) == "met"
  assert readme.verdict([0.3, 0.4], lambda v: v <= 0.35) == "met in 1 of 2"
  assert readme.verdict([0.4], lambda v: v <= 0.35) == "missed"
  assert readme.verdict([], lambda v: v <= 0.35) == "not measured"


def test_splice_replaces_only_marked_tables_that_have_results(tmp_path):
  (tmp_path / "memory.md").write_text("new table\n")
  text = ("a\n<!-- bench:memory -->\nold\n<!-- /bench:memory -->\n"
          "<!-- bench:gpu -->\nkept\n<!-- /bench:gpu -->\n")
  out = readme.splice(text, str(tmp_path))
  assert "new table" in out and "old" not in out and "kept" in out

"""Targets summary, and the README's Results tables spliced in from bench/results.

Reads the JSON results of the other benchmarks (nothing is measured here) and

* writes `bench/results/targets.md`: per method, where it stands against the
  project's targets (projected-matrix state <= 0.35x AdamW, compiled peak
  below AdamW and optax.contrib.galore, non-refresh step <= 1.05x AdamW,
  SubTrack++ refresh >= 10x cheaper than the SVD refresh, final eval loss
  within 2% of AdamW), every figure computed from the result files;
* replaces, in README.md, the text between each pair of markers
  `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with
  `bench/results/NAME.md`, so the README's tables are the generated ones;
* writes `bench/results/memory_fits.md`, the "what fits" table of
  `memory.json` (bench.memory --fits), before splicing.

  python -m bench.readme
"""

import argparse
import os
import re

import subspax

from bench import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSPAX = tuple(subspax.METHODS)


def load(out: str, name: str) -> dict | None:
  return _common.load_json(os.path.join(out, f"{name}.json"))


def span(values: list[float]) -> str:
  if not values:
    return "-"
  lo, hi = min(values), max(values)
  return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def verdict(values: list[float], ok) -> str:
  if not values:
    return "not measured"
  n = sum(bool(ok(v)) for v in values)
  return "met" if n == len(values) else ("missed" if n == 0 else
                                         f"met in {n} of {len(values)}")


def eval_loss_ratios(result: dict | None, name: str, sweep: bool) -> list[float]:
  """Final eval loss ratios to AdamW's.

  Sweep (the short run): at the preset lr to AdamW's at the preset lr, and
  the best of the sweep to AdamW's best. Otherwise (the long run): at the
  preset lr to AdamW's best over the lrs it ran at.
  """
  if not result:
    return []
  runs = result["runs"]
  lr0 = result["args"]["default_lr"]
  at = {(r["method"], r["lr"]): r["final_eval_loss"] for r in runs}
  if (name, lr0) not in at or ("adamw", lr0) not in at:
    return []
  best = lambda m: min(r["final_eval_loss"] for r in runs if r["method"] == m)
  if sweep:
    return [at[(name, lr0)] / at[("adamw", lr0)], best(name) / best("adamw")]
  return [at[(name, lr0)] / best("adamw")]


def targets(out: str) -> str:
  memory, refresh = load(out, "memory"), load(out, "refresh")
  step, conv = load(out, "step_time"), load(out, "convergence")
  long_conv = load(out, "convergence_long")
  methods = list(SUBSPAX) + ["optax_galore"]
  rows, notes = [], []
  for name in methods:
    state, peak_a, peak_o, peak_cells, peak_o_cells = [], [], [], [], []
    for res in (memory or {}).get("results", []):
      ms = res["methods"]
      if name not in ms or "adamw" not in ms:
        continue
      m, ref = ms[name], ms["adamw"]
      state.append(m["projected_state_bytes"] / ref["projected_state_bytes"])
      tag = res["size"] + (" scan" if res["scan"] else "")
      peak_a.append(m["compiled"]["peak"] / ref["compiled"]["peak"])
      peak_cells.append(f"{tag} {peak_a[-1]:.2f}")
      og = ms.get("optax_galore")
      if og and name != "optax_galore":
        peak_o.append(m["compiled"]["peak"] / og["compiled"]["peak"])
        peak_o_cells.append(f"{res['size']} {peak_o[-1]:.2f}")
    whole = []
    for res in (step or {}).get("results", []):
      r = res["vs_adamw"].get(name)
      if r:
        whole.append((res["preset"], r["plain"]["median"], r["amortized"]["median"]))
    opt_only = [res["vs_adamw"][f"{name}/plain"]["median"]
                for res in (refresh or {}).get("results", [])
                if f"{name}/plain" in res["vs_adamw"]]
    loss = []  # long run at the preset lr, then the short sweep: preset / best
    for result, sweep in ((long_conv, False), (conv, True)):
      loss += eval_loss_ratios(result, name, sweep)
    rows.append([
        name, span(state), ", ".join(peak_cells) or "-",
        ", ".join(peak_o_cells) or "-",
        ", ".join(f"{p} {a:.2f} / {b:.2f}" for p, a, b in whole) or "-",
        span(opt_only),
        " / ".join(f"{x:.3f}" for x in loss) or "-"])
    notes.append((name, state, peak_a, peak_o, [w[1] for w in whole], opt_only,
                  loss))
  lines = [
      "Per method, as ratios to AdamW measured in the same run (memory: same "
      "size and layout). Projected state: attention and MLP kernels only "
      "(bench.memory, every size). Peak: compiled train step (bench.memory; "
      "'scan' = scanned layers, otherwise unrolled). Train step: whole step, "
      "plain / amortized, median (bench.step_time). Optimizer update: one "
      "non-refresh `tx.update` of one matrix, median, range over the shapes "
      "and ranks of bench.refresh. Eval loss: final eval loss of the long run "
      "at the preset lr vs AdamW's best lr in that run (bench.convergence "
      "--name convergence_long, when present), then of the 60-step run at the "
      "preset lr / best of its lr sweep (bench.convergence).", "",
      _common.markdown_table(
          ["method", "projected state x AdamW", "peak x AdamW",
           "peak x optax_galore", "train step x AdamW (plain / amortized)",
           "optimizer update x AdamW", "eval loss x AdamW"], rows), "",
      "Targets, computed from the same files:", ""]
  for name, state, peak_a, peak_o, whole, opt_only, loss in notes:
    parts = [
        f"state <= 0.35x: {verdict(state, lambda v: v <= 0.35)}",
        f"peak < AdamW: {verdict(peak_a, lambda v: v < 1)}",
        f"peak < optax_galore: {verdict(peak_o, lambda v: v < 1)}"
        if name != "optax_galore" else None,
        f"train step <= 1.05x: {verdict(whole, lambda v: v <= 1.05)}",
        f"optimizer update <= 1.05x: {verdict(opt_only, lambda v: v <= 1.05)}",
        f"eval loss within 2%: {verdict(loss, lambda v: v <= 1.02)}",
    ]
    lines.append(f"- **{name}**: " + "; ".join(p for p in parts if p) + ".")
  if refresh:
    cases = refresh_ratios(refresh)
    for key, what in (("policy", "the policies alone (`SvdSubspace` vs "
                                 "`GeodesicSubspace` refresh)"),
                      ("update", "the whole `tx.update` at a refresh step "
                                 "(galore vs subtrack, `/refresh` rows)")):
      ratios = [c[key] for c in cases if c[key] is not None]
      listed = ", ".join(f"{c['case']} {c[key]:.1f}x" for c in cases
                         if c[key] is not None)
      lines.append(f"- **SubTrack++ refresh >= 10x cheaper than the SVD "
                   f"refresh**, {what}: {verdict(ratios, lambda v: v >= 10)}"
                   f" ({listed or 'not measured'}).")
  return "\n".join(lines)


def refresh_ratios(refresh: dict) -> list[dict]:
  """GaLore's SVD refresh over SubTrack++'s, per shape and rank of
  bench.refresh: the policies alone (``svd_over_geodesic``) and the whole
  ``tx.update`` at a refresh step (``galore/refresh`` over
  ``subtrack/refresh``), each the median over rounds of the same-round ratio.

  Returns:
    ``[{"case": "4096x1024 r128", "policy": x, "update": y}, ...]``; a ratio
    is None when that row was not measured.
  """
  out = []
  for res in refresh["results"]:
    seconds = res.get("seconds", {})
    update = None
    if "galore/refresh" in seconds and "subtrack/refresh" in seconds:
      update = _common.ratio_stats(seconds["galore/refresh"]["all"],
                                   seconds["subtrack/refresh"]["all"])["median"]
    policy = res.get("svd_over_geodesic", {}).get("median")
    out.append({"case": f"{res['shape'][0]}x{res['shape'][1]} r{res['rank']}",
                "policy": policy, "update": update})
  return out


def fits_table(out: str) -> str | None:
  """The 'what fits' table of memory.json (bench.memory --fits), or None.

  Per method and device-memory budget: the largest LLaMA preset whose
  compiled train step fits, with its peak; then every peak that was compiled
  to find it.
  """
  fits = (load(out, "memory") or {}).get("fits")
  if not fits:
    return None
  gib = lambda b: f"{b / 2**30:.1f}"
  label = lambda size: size.upper()
  rows, peak_rows = [], []
  for name, largest in fits["largest"].items():
    peaks = fits["peaks"][name]
    rows.append([name] + [
        f"{label(largest[str(b)])} ({gib(peaks[largest[str(b)]])})"
        if largest[str(b)] else "none" for b in fits["budgets_gib"]])
    peak_rows.append([name] + [gib(peaks[s]) if s in peaks else "-"
                               for s in fits["sizes"]])
  budgets = [f"{b} GiB" for b in fits["budgets_gib"]]
  return "\n".join([
      f"Largest LLaMA preset whose compiled train step fits each device memory "
      f"budget, and its peak in GiB (batch {fits['batch']} x seq {fits['seq']}, "
      f"bf16 compute, remat, scanned layers, one device; peak = argument + temp "
      f"+ output - alias of XLA's `memory_analysis()` on the CPU; measured "
      f"{fits['measured']}). Rows: the method with float32 weights and "
      f"optimizer states; `+layerwise`: each layer updated inside the backward "
      f"scan (`opt.layerwise`); `+layerwise+bf16`: also bfloat16 weights "
      f"(stochastic rounding), moments and bases.", "",
      _common.markdown_table(["method", *budgets], rows), "",
      "Compiled peaks in GiB ('-': not needed for the answer, not compiled):", "",
      _common.markdown_table(["method", *map(label, fits["sizes"])], peak_rows),
  ])


def splice(readme: str, out: str) -> str:
  def replace(match):
    name = match.group(1)
    path = os.path.join(out, f"{name}.md")
    if not os.path.exists(path):  # not run yet: leave the README as it is
      return match.group(0)
    with open(path) as f:
      body = f.read().strip()
    return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"
  return re.sub(r"<!-- bench:(\w+) -->\n.*?<!-- /bench:\1 -->", replace, readme,
                flags=re.S)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  args = parser.parse_args()
  with open(os.path.join(args.out, "targets.md"), "w") as f:
    f.write(targets(args.out) + "\n")
  fits = fits_table(args.out)
  if fits:
    with open(os.path.join(args.out, "memory_fits.md"), "w") as f:
      f.write(fits + "\n")
  with open(args.readme) as f:
    text = f.read()
  new = splice(text, args.out)
  if new != text:
    with open(args.readme, "w") as f:
      f.write(new)
  print(f"wrote {args.out}/targets.md; README.md "
        f"{'updated' if new != text else 'unchanged'}")


if __name__ == "__main__":
  main()

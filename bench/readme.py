"""The results page and the README's summary table, generated from bench/results.

Reads the JSON and Markdown results of the other benchmarks (nothing is
measured here) and writes

* `docs/results.md`: a summary table per method, then one section per
  benchmark: what it measures, its table (`bench/results/<name>.md`), the
  compiler and machine its figures come from (read from the JSON records) and
  the commands that produced it;
* in `README.md`, the text between the markers `<!-- bench:summary -->` and
  `<!-- /bench:summary -->`: the same summary table; between
  `<!-- bench:presets -->` and `<!-- /bench:presets -->`: the memory-saving
  presets' peaks beside AdamW's, compiled for H100s; between
  `<!-- bench:published -->` and `<!-- /bench:published -->`: the papers'
  memory figures (`PUBLISHED`, typed with where each paper gives them) beside
  the presets' compiled peaks.

So every figure the documentation shows comes from the result files, and the
README and the results page cannot disagree.

  python -m bench.readme            # rewrite both
  python -m bench.readme --check    # exit 1 if either is not what the results give
"""

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import subspax

from bench import _common
from bench import convergence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSPAX = tuple(subspax.METHODS)
MARKERS = ("summary", "presets", "published")


class Section(NamedTuple):
  """One benchmark's part of the results page."""
  name: str  # bench/results/<name>.{json,md}
  title: str
  about: str  # one paragraph: what the table measures
  image: str | None = None  # a plot in bench/results, shown above the table


SECTIONS = (
    Section("single_matrix", "Memory of one optimizer update",
            "One compiled `tx.update` of a 1024 x 1024 float32 weight at rank "
            "128, gradient and state donated. Peak = argument + temp + output "
            "- alias (`train.memory.compiled_memory`, the definition the "
            "trainer and every benchmark use)."),
    Section("update_memory", "Memory of one update over many matrices",
            "The same update over the 56 attention and MLP kernels of "
            "LLaMA-60M, as separate leaves (an unrolled model) or as 7 "
            "stacked leaves (a scanned one). The core updates one matrix at a "
            "time in row blocks, so the workspace is about one matrix's."),
    Section("memory_h100", "Memory of the train step on an H100",
            "The compiled, donated train step of the LLaMA presets at the "
            "papers' ranks, compiled by XLA's GPU compiler for an H100 SXM "
            "80 GB on a machine without a GPU (`--target h100`): exact "
            "optimizer-state bytes and the compiler's memory estimate. A "
            "subspax method's run alternates an ordinary step and a refresh "
            "step (two programs); its peak is the larger of the two."),
    Section("memory_h100_fits", "How big a model fits on one GPU",
            "Per method and device-memory budget, the largest preset whose "
            "compiled train step fits, on the H100 compiler "
            "(`memory_h100.json`)."),
    Section("memory_h100_presets", "The memory-saving presets on H100s",
            "The dry runs of the presets as configured (their own batch and "
            "mesh; `llama_70b_8x80gb` on eight H100s, the others on one), "
            "compiled for H100s, beside AdamW in the same shapes, batch and "
            "mesh (float32 weights and moments). GiB; temporaries and peaks "
            "per device, weights and optimizer state over all devices."),
    Section("memory_h100_published", "The presets beside the published figures",
            "Each paper's headline memory figure, with its setting and how it "
            "was obtained, beside the subspax presets for the same model and "
            "a device of that size, compiled for one H100 "
            "(`memory_h100.json`)."),
    Section("memory", "Memory of the train step, 60M to 7B, CPU compiler",
            "The same train steps compiled by XLA's CPU compiler, in both "
            "layouts. Compare methods within one table: the scanned and "
            "unrolled layouts are scheduled differently."),
    Section("memory_fits", "How big a model fits, CPU compiler",
            "Per method and device-memory budget, the largest preset whose "
            "compiled train step fits (from `memory.json`)."),
    Section("memory_presets", "The one-device presets, CPU compiler",
            "The dry runs of `configs/llama_7b_24gb.py` and "
            "`configs/llama_13b_40gb.py` as configured (GiB)."),
    Section("refresh", "Refresh cost",
            "One subspace refresh per policy, and each method's whole "
            "`tx.update` at a plain step, at a refresh step and amortized, "
            "as ratios to one `optax.adam` update of the same matrix."),
    Section("step_time", "Step time",
            "The whole train step per method as a ratio to AdamW's, timed "
            "in one process, interleaved round-robin, median (min) over "
            "rounds. Compare ratios within one table, not seconds."),
    Section("layerwise", "Layer-wise updates",
            "`opt.layerwise=True` against the ordinary step of the same "
            "method: time and compiled peak."),
    Section("reparam", "GRASS sparse gradients and RSO subspace layers",
            "The trainer's `opt.subspace_layers=True` modes against the "
            "plain transformations: memory, FLOPs and time."),
    Section("convergence", "Convergence: the 60-step learning-rate sweep",
            "Every method on the tiny preset with the same data, seed and "
            "tokens, at three learning rates.", "convergence.png"),
    Section("convergence_long", "Convergence: 400 steps",
            "Every method at its paper defaults and the preset learning rate; "
            "AdamW at three learning rates.", "convergence_long.png"),
    Section("baseline", "Convergence: against a tuned AdamW",
            "The 400-step setting again, with AdamW given a learning-rate "
            "sweep at half-decade steps and, as a row of its own "
            "(`adamw_split`), the two learning-rate groups the subspax "
            "methods have (`opt.block_lr_scale`; swept more finely around its "
            "best); the best subspax methods of the 400-step run at the "
            "preset learning rate; then each row at its best learning rate "
            "with a second seed. The summary at the top of this page says "
            "what survives.", "baseline.png"),
    Section("precision", "bfloat16 weights with stochastic rounding",
            "float32 weights against bfloat16 weights with stochastic and "
            "with round-to-nearest updates."),
    Section("precision_low_lr", "bfloat16 weights at a ten times smaller "
            "learning rate",
            "The same comparison at lr 3e-4, where most updates are below "
            "half a bfloat16 ulp of the weights."),
    Section("int8_quality", "int8 kernels with stochastic rounding",
            "The blocks' kernels in int8 (`model.kernel_format=int8`, "
            "layer-wise updates) against bfloat16 weights, both with "
            "stochastic rounding, int8 rounded to nearest, and int8 "
            "kernels with the bases in 8 bits too (`opt.basis_dtype=int8`) "
            "(`python -m bench.precision --name int8_quality --variants "
            "bf16_sr,int8_sr,int8_rn,int8_sr_int8_bases`)."),
)


def load(out: str, name: str) -> dict | None:
  return _common.load_json(os.path.join(out, f"{name}.json"))


def span(values: Sequence[float], digits: int = 2) -> str:
  if not values:
    return "-"
  lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
  return lo if lo == hi else f"{lo}-{hi}"


# Which compiler and machine a record's figures come from.


def compiler(record: dict[str, Any]) -> str:
  """The compiler a result's figures come from, e.g. "XLA CPU compiler".

  New records name it (`target`, `platform` or `device_kind`, at the top or
  in `machine`); older ones were all compiled for the CPU they ran on.
  """
  machine = record.get("machine") or {}
  get = lambda key: record.get(key) or machine.get(key)
  target, platform, kind = get("target"), get("platform"), get("device_kind")
  if not platform:
    platform = "cpu" if not kind or str(kind).lower() == "cpu" else "gpu"
  platform = str(platform).lower()
  backend = {"cuda": "GPU", "rocm": "GPU"}.get(platform, platform.upper())
  text = f"XLA {backend} compiler"
  if target:
    return f"{text} for {target} (compiled without the device)"
  if backend != "CPU" and kind:
    return f"{text} on {kind}"
  return text


def machines(record: dict[str, Any]) -> list[str]:
  """The distinct machines of a record's calls, e.g. "AMD EPYC (2 cores)"."""
  infos = [c["machine"] for c in record.get("calls", []) if "machine" in c]
  infos = infos or [record.get("machine") or {}]
  out = []
  for info in infos:
    facts = [f"{info.get('cpu_count', '?')} cores"]
    kind = info.get("device_kind")
    if kind and str(kind).lower() != "cpu":
      facts.append(str(kind))
    versions = info.get("versions") or {}
    facts += [f"{k} {versions[k]}" for k in ("jax", "flax", "optax")
              if k in versions]
    text = f"{info.get('cpu', 'unknown CPU')} ({', '.join(facts)})"
    if text not in out:
      out.append(text)
  return out


def commands(record: dict[str, Any], name: str) -> list[str]:
  """The command lines that wrote a record, run with the project's venv."""
  lines = [c["command"] for c in record.get("calls", []) if c.get("command")]
  lines = lines or [f"python -m bench.{record.get('benchmark', name)}"]
  out = []
  for line in lines:
    line = re.sub(r"^python ", ".venv/bin/python ", line)
    if line not in out:
      out.append(line)
  return out


def provenance(record: dict[str, Any], name: str) -> str:
  hosts = machines(record)
  return "\n".join([
      f"Compiler: {compiler(record)}. Machine{'s' if len(hosts) > 1 else ''}: "
      + " and ".join(hosts) + ".", "",
      "<!-- check: skip: minutes to hours -->",
      "```bash", *commands(record, name), "```"])


def clean(table: str) -> str:
  """A benchmark's Markdown without its machine line and measurement dates
  (the page states machine and commands once per section)."""
  lines = [l for l in table.strip().splitlines()
           if not l.startswith("Machine: ")]
  text = "\n".join(lines).strip()
  return re.sub(r"; measured \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", text)


# The summary table.


def summary(out: str) -> str:
  """Per method, the headline ratios to AdamW, from the result files."""
  memory = load(out, "memory_h100") or load(out, "memory")
  step = load(out, "step_time")
  conv = load(out, "convergence_long")
  tuned = tuned_adamw(load(out, "baseline"))
  results = (memory or {}).get("results", [])
  rows = []
  for name in list(SUBSPAX) + ["optax_galore"]:
    state, peak = [], []
    for res in results:
      ms = res["methods"]
      if name in ms and "adamw" in ms:
        state.append(ms[name]["projected_state_bytes"]
                     / ms["adamw"]["projected_state_bytes"])
        if res["scan"]:
          peak.append(ms[name]["compiled"]["peak"]
                      / ms["adamw"]["compiled"]["peak"])
    steps = {res["preset"]: res["vs_adamw"][name]["amortized"]["median"]
             for res in (step or {}).get("results", [])
             if name in res["vs_adamw"]}
    loss = eval_loss_ratios(conv, name, sweep=False, reference=tuned)
    rows.append([f"`{name}`", span(state, 4 if max(state, default=1) < 0.01
                                   else 2),
                 span(peak), span(list(steps.values())),
                 f"{loss[0]:.2f}" if loss else "-"])
  sizes = sorted({res["size"] for res in results if res["scan"]},
                 key=lambda s: float(s[:-1]) * (1000 if s[-1] == "b" else 1))
  presets = [res["preset"].upper() if res["preset"][0].isdigit()
             else res["preset"] for res in (step or {}).get("results", [])]
  record = memory or {}
  return "\n".join([
      _common.markdown_table(
          ["method", "projected state x AdamW",
           f"train-step peak x AdamW ({', '.join(sizes).upper()}, scanned)",
           f"train step time x AdamW ({', '.join(presets)})",
           "final eval loss x " + ("tuned AdamW" if tuned else "AdamW's best")
           + " (400 steps)"], rows), "",
      "Ranges are over model sizes or presets. State: the attention and MLP "
      "kernels, exact bytes ([memory](docs/results.md#"
      f"{_anchor(memory_section(memory).title)})); "
      f"peak: the compiled train step's, as estimated by the {compiler(record)}; "
      "step time: amortized over the refresh interval, median of interleaved "
      "rounds ([step time](docs/results.md#step-time)); loss: the tiny preset, "
      + (f"seed 0, each method at the preset learning rate against AdamW at its "
         f"best of {tuned[1]} ([convergence](docs/results.md#convergence-400-steps), "
         f"[baseline](docs/results.md#{_anchor(_title('baseline'))})).\n\n"
         + baseline_verdict(load(out, "baseline"), conv)
         if tuned else
         "AdamW at its best of three learning rates "
         "([convergence](docs/results.md#convergence-400-steps))."),
  ])


def _title(name: str) -> str:
  return next(s.title for s in SECTIONS if s.name == name)


def tuned_adamw(result: dict | None) -> tuple[float, str] | None:
  """(final eval loss, description) of the tuned AdamW of a baseline result
  (`bench.convergence --name baseline`) at its sweep seed, or None.

  The lowest over every learning rate of `adamw` and of the `VARIANTS` rows
  that are AdamW (`adamw_split`).
  """
  if not result:
    return None
  first = convergence.sweep_seed(result)
  runs = [r for r in result["runs"]
          if convergence.run_seed(r, result) == first
          and convergence.VARIANTS.get(r["method"], (r["method"],))[0] == "adamw"]
  if not runs:
    return None
  plain = len({r["lr"] for r in runs if r["method"] == "adamw"})
  split = len({r["lr"] for r in runs if r["method"] != "adamw"})
  return (min(r["final_eval_loss"] for r in runs),
          f"{plain} learning rates, and {split} with the subspax methods' "
          "per-group learning rates" if split else f"{plain} learning rates")


def baseline_verdict(result: dict, long: dict | None = None) -> str:
  """Whether the subspax methods beat the tuned AdamW of a baseline result.

  Examples:
    >>> run = lambda m, lr, seed, loss: {"method": m, "lr": lr, "seed": seed,
    ...                                  "final_eval_loss": loss}
    >>> result = {"args": {"seeds": "0"}, "methods": ["adamw", "subtrack"],
    ...           "runs": [run("adamw", 1e-3, 0, 5.0), run("subtrack", 3e-3, 0, 5.5)]}
    >>> "at this scale the tuned AdamW wins" in baseline_verdict(result)
    True

  Args:
    result: A baseline result (`bench.convergence --name baseline`).
    long: The 400-step run of every method (`convergence_long`), whose other
      methods (one seed, the preset lr) are compared with the tuned AdamW
      at the same seed; None: not mentioned.

  Returns:
    Two sentences in Markdown: the tuned AdamW, the best subspax method,
    their mean final eval losses and ratio (with its range over seeds), and
    which methods beat it at every seed.
  """
  rows = convergence.seed_rows(result)
  tuned = next(r for r in rows if r["method"] == rows[0]["tuned"])
  methods = [r for r in rows if convergence.VARIANTS.get(
      r["method"], (r["method"],))[0] != "adamw"]
  seeds = sorted({s for r in rows for s in r["losses"]})
  best = min(methods, key=lambda r: r["mean"])
  wins = [r["method"] for r in methods if max(r["per_seed"].values()) < 1]
  losses = [r["method"] for r in methods if min(r["per_seed"].values()) > 1]
  names = lambda ms: ", ".join(f"`{m}`" for m in ms)
  spread = (f", {min(best['per_seed'].values()):.3f}-"
            f"{max(best['per_seed'].values()):.3f} over seeds"
            if len(best["per_seed"]) > 1 else "")
  if not wins and len(losses) == len(methods):
    verdict = ("the tuned AdamW wins: no subspax method measured "
               f"({names(losses)}) beats it")
  elif len(wins) == len(methods):
    verdict = (f"{names(wins)} beat{'s' if len(wins) == 1 else ''} the tuned "
               f"AdamW at every seed")
  else:
    verdict = (f"{names(wins) or 'no method'} beat{'s' if len(wins) == 1 else ''} "
               f"the tuned AdamW at every seed, {names(losses) or 'none'} "
               f"lose{'s' if len(losses) == 1 else ''} to it at every seed")
  text = (f"Against a tuned AdamW (`{tuned['method']}` at lr {tuned['lr']:g}, "
          f"{tuned['mean']:.3f} mean final eval loss over seeds "
          f"{', '.join(map(str, seeds))}), the best subspax method, "
          f"`{best['method']}` at lr {best['lr']:g}, reaches {best['mean']:.3f} "
          f"({best['vs_tuned']:.3f}x{spread}): at this scale {verdict}.")
  first = convergence.sweep_seed(result)
  if long and first in tuned["losses"]:
    lr0 = long["args"]["default_lr"]
    ref = tuned["losses"][first]
    others = {r["method"]: r["final_eval_loss"] / ref for r in long["runs"]
              if r["lr"] == lr0 and r["method"] != "adamw"
              and r["method"] not in {m["method"] for m in methods}
              and convergence.run_seed(r, long) == first}
    above = sorted((m for m, x in others.items() if x >= 1), key=others.get)
    below = [x for m, x in others.items() if m not in above]
    parts = ([f"{names(above)} end{'s' if len(above) == 1 else ''} at or above "
              f"it ({', '.join(f'{others[m]:.3f}x' for m in above)})"]
             if above else [])
    parts += ([f"the other {len(below)} below it ({min(below):.3f}-"
               f"{max(below):.3f}x)"] if below else [])
    if parts:
      text += (f" Of the other methods of the 400-step run (seed {first}, the "
               f"preset lr only), {'; '.join(parts)}.")
  return (text + " Measured on a 2-core CPU (tiny preset, 400 steps of 8 x 128 "
          "tokens) with `python -m bench.convergence --name baseline ...` "
          f"([the commands](docs/results.md#{_anchor(_title('baseline'))})).")


def eval_loss_ratios(result: dict | None, name: str, sweep: bool,
                     reference: tuple[float, str] | None = None) -> list[float]:
  """Final eval loss ratios to AdamW's.

  Sweep (the short run): at the preset lr to AdamW's at the preset lr, and
  the best of the sweep to AdamW's best. Otherwise (the long run): at the
  preset lr to AdamW's best over the lrs it ran at, or to `reference`'s
  loss (`tuned_adamw`) where given.
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
  return [at[(name, lr0)] / (reference[0] if reference else best("adamw"))]


def memory_section(record: dict | None) -> Section:
  """The results-page section of a bench.memory record."""
  name = (record or {}).get("benchmark", "memory")
  return next(s for s in SECTIONS if s.name == name)


# What a row suffix of the fits table means (bench.memory's VARIANTS).
VARIANT_ABOUT = {
    "layerwise": "each layer updated inside the backward scan (`opt.layerwise`)",
    "layerwise+bf16": "also bfloat16 weights (stochastic rounding), moments "
                      "and bases",
    "layerwise+int8": "layer-wise in the memory-saving precision of the large "
                      "presets (`configs.base.memory_saving`: bfloat16 weights "
                      "and bases, the method's reduced moments and the "
                      "embedding's and head's in 8 bits) with the blocks' "
                      "kernels in int8 "
                      "(`model.kernel_format=int8`, stochastic rounding)",
}


def fits_table(out: str, name: str = "memory") -> str | None:
  """The 'what fits' table of `name`.json (bench.memory --fits), or None.

  Per method and device-memory budget: the largest LLaMA preset whose
  compiled train step fits, with its peak; then every peak that was compiled
  to find it. A row searched at fewer budgets than the table's (rows merged
  from runs with other `--fits`) shows '-' under the others.
  """
  fits = (load(out, name) or {}).get("fits")
  if not fits:
    return None
  gib = lambda b: f"{b / 2**30:.1f}"
  label = lambda size: size.upper()

  def answer(largest: dict, peaks: dict, budget) -> str:
    if str(budget) not in largest:
      return "-"
    size = largest[str(budget)]
    return f"{label(size)} ({gib(peaks[size])})" if size else "none"

  rows, peak_rows = [], []
  for name, largest in fits["largest"].items():
    peaks = fits["peaks"][name]
    rows.append([name] + [answer(largest, peaks, b) for b in fits["budgets_gib"]])
    peak_rows.append([name] + [gib(peaks[s]) if s in peaks else "-"
                               for s in fits["sizes"]])
  budgets = [f"{b} GiB" for b in fits["budgets_gib"]]
  variants = [v for v in fits.get("variants") or VARIANT_ABOUT
              if v in VARIANT_ABOUT]
  partial = any(str(b) not in largest for largest in fits["largest"].values()
                for b in fits["budgets_gib"])
  return "\n".join([
      f"Largest LLaMA preset whose compiled train step fits each device memory "
      f"budget, and its peak in GiB (batch {fits['batch']} x seq {fits['seq']}, "
      f"bf16 compute, remat, scanned layers, one device; peak = argument + temp "
      f"+ output - alias of XLA's `memory_analysis()`). Rows: the method with "
      f"float32 weights and optimizer states"
      + "".join(f"; `+{v}`: {VARIANT_ABOUT[v]}" for v in variants) + "."
      + (" '-': the row was not searched at that budget." if partial else ""), "",
      _common.markdown_table(["method", *budgets], rows), "",
      "Compiled peaks in GiB ('-': not needed for the answer, not compiled):", "",
      _common.markdown_table(["method", *map(label, fits["sizes"])], peak_rows),
  ])


# The page.


def _table(out: str, name: str) -> str | None:
  if name.endswith("_fits"):
    return fits_table(out, name[:-len("_fits")])
  if name.endswith("_published"):
    return published_table(out, name[:-len("_published")], detail=True)
  path = os.path.join(out, f"{name}.md")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def _anchor(title: str) -> str:
  """GitHub's anchor of a heading."""
  return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def results_page(out: str) -> str:
  """docs/results.md: the summary, then one section per benchmark that ran."""
  relative = os.path.relpath(out, os.path.join(ROOT, "docs"))
  parts, toc, shown = [], [], {}
  for section in SECTIONS:
    table = _table(out, section.name)
    if table is None:
      continue
    source = re.sub(r"_(fits|presets|published)$", "", section.name)
    body = [f"## {section.title}", "", section.about, ""]
    if section.image:
      body += [f"![{section.title}]({relative}/{section.image})", ""]
    body.append(clean(table))
    if source in shown:  # the same record as an earlier section
      body += ["", f"Compiler, machines and commands: as in [{shown[source]}]"
               f"(#{_anchor(shown[source])})."]
    else:
      body += ["", provenance(load(out, source) or {}, source)]
      shown[source] = section.title
    parts.append("\n".join(body))
    toc.append(f"- [{section.title}](#{_anchor(section.title)})")
  return "\n".join([
      "# Results",
      "",
      "<!-- Generated by `python -m bench.readme` from bench/results; edit "
      "bench/readme.py, not this file. -->",
      "",
      "Every figure on this page is read from `bench/results/<name>.json` "
      "(raw numbers, machine, command lines) and `<name>.md` (the table the "
      "benchmark printed); `bench/README.md` describes each benchmark and its "
      "options. Memory figures are exact state bytes and the compiler's "
      "estimate of the compiled program (`memory_analysis()`); each section "
      "names the compiler. Timings are ratios to AdamW measured in the same "
      "process, so compare them within one table. The commands run from the "
      "repository root in the project's virtual environment, `.venv` (made by "
      "`bash scripts/train.sh`; see the README's Install).",
      "",
      "## Summary",
      "",
      summary(out),
      "",
      *toc,
      "",
      "\n\n".join(parts),
      "",
  ])


def presets_summary(out: str) -> str:
  """The README's table of the memory-saving presets (`memory_h100.json`):
  per device, the larger peak of the ordinary and the refresh step, beside
  AdamW in the same shapes, batch and mesh."""
  record = load(out, "memory_h100") or {}
  presets = record.get("presets") or {}
  if not presets:
    return "(no presets measured: run `python -m bench.memory --target h100`)"
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  rows = []
  for name, p in presets.items():
    peak = max(p["step"]["peak"], (p["refresh"] or {}).get("peak", 0))
    devices = p.get("devices", 1)
    rows.append([f"[`{name}`](configs/{name}.py)", f"{p['params'] / 1e9:.1f}B",
                 _common.method_and_rank(p), _common.tokens_per_step(p),
                 f"{devices} x H100" if devices > 1 else "1 x H100",
                 gib(peak), gib(p["adamw"]["peak"]) if p.get("adamw") else "-"])
  return "\n".join([
      _common.markdown_table(["preset", "model", "method", "tokens per step",
                              "devices", "peak per device", "AdamW's peak"],
                             rows),
      "",
      "Peak: the larger of the ordinary and the refresh step's compiled peaks, "
      "as estimated by the XLA GPU compiler for H100 80 GB (compiled without "
      "the device); AdamW: float32 weights and moments in the same shapes, "
      "batch and mesh ([presets](docs/results.md#the-memory-saving-presets-on-h100s))."])


class Published(NamedTuple):
  """A paper's memory figure, and the presets shown beside it."""
  method: str  # the paper's method
  arxiv: str  # its arXiv id
  claim: str  # the figure, as the paper states it
  setting: str  # what the paper's figure trains, in short
  source: str  # where the paper gives it, and how it was obtained
  presets: tuple[str, ...]  # configs/<name>.py, dry-run in memory_h100.json


# The papers' own figures (typed here, with where each paper states it); the
# presets' figures are read from the results.
PUBLISHED = (
    Published("GaLore", "2403.03507", "LLaMA-7B in 22.0 GB",
              "8-bit Adam in the subspace, per-layer weight updates, BF16 "
              "weights, a token batch of 256, no activation checkpointing",
              "measured on one GPU (Sec. 5.5 and Fig. 4), within the 24 GB "
              "of an RTX 4090; the paper's Fig. 1 is an estimate for the same "
              "setting, and the GaLore repository's README gives 22.8G at "
              "batch size 16 with activation checkpointing",
              ("llama_7b_24gb",)),
    Published("Q-GaLore", "2407.08296", "LLaMA-7B in about 15 GB",
              "INT8 weights with stochastic rounding, INT4 projections, "
              "8-bit Adam, per-layer weight updates",
              "end-to-end measurement (Sec. 4.2.2: \"only around 15GB\", Table "
              "2: 15G; Fig. 5: \"a single batch size of 256\"), trained on a "
              "16 GB RTX 4060 Ti", ("llama_7b_16gb",)),
    Published("APOLLO-Mini", "2412.05270", "LLaMA-7B in 12 GB",
              "rank 1, INT8 weights (Q-GaLore's), layer-wise updates, "
              "\"a single batch size\"",
              "a memory breakdown for a single batch (Sec. 5.3 and Fig. 1), "
              "\"assuming a layer-wise gradient update strategy\"",
              ("llama_7b_12gb",)),
    Published("GRASS", "2406.17660", "LLaMA-13B on one 40 GB A100",
              "half-precision (BF16) weights, structured sparse gradients",
              "the abstract's claim; the paper gives its batch and sequence "
              "length", ("llama_13b_40gb", "llama_13b_24gb")),
)


def preset_setting(name: str) -> str:
  """How `configs/<name>.py` stores and updates the model, in short."""
  cfg = importlib.import_module(f"configs.{name}").get_config()
  opt, model = cfg.opt, cfg.model
  int8 = model.kernel_format == "int8"
  weights = "bf16" if model.param_dtype == "bfloat16" else "fp32"
  parts = [f"int8 kernels, {weights} rest" if int8 else f"{weights} weights"]
  quantized = opt.get(opt.name, {}).get("quantize_moments", "off") != "off"
  moments = "bf16" if opt.mu_dtype == "bfloat16" else "fp32"
  parts.append(f"{'8-bit' if quantized else moments} moments")
  if opt.get("basis_dtype", "float32") != "float32" and opt.name not in (
      "apollo", "apollo_mini", "grass"):  # those store no dense basis
    parts.append(f"{opt.basis_dtype.replace('bfloat16', 'bf16')} bases")
  if opt.subspace_layers:
    parts.append("sparse-gradient layers")
  if opt.layerwise:
    parts.append("layer-wise")
  if model.remat:
    parts.append("activation checkpointing")
  return ", ".join(parts)


def published_table(out: str, name: str = "memory_h100",
                    detail: bool = False) -> str:
  """The papers' memory figures (`PUBLISHED`) beside the presets' compiled
  peaks in `name`.json (the larger of the ordinary and the refresh step's;
  '-' where the preset was not dry-run); `detail` adds where each paper gives
  its figure and the notes on what differs."""
  presets = (load(out, name) or {}).get("presets") or {}
  root = "../" if detail else ""  # docs/results.md links from docs/
  rows = []
  for paper in PUBLISHED:
    for i, preset in enumerate(paper.presets):
      p = presets.get(preset)
      peak = "-" if not p else (
          f"{max(p['step']['peak'], (p['refresh'] or {}).get('peak', 0)) / 2**30:.1f} GiB")
      ours = ("-" if not p else
              f"{_common.method_and_rank(p)}, {_common.tokens_per_step(p)} "
              f"tokens per step, ") + preset_setting(preset)
      cite = f"[{paper.method}](https://arxiv.org/abs/{paper.arxiv}): {paper.claim}"
      first = [cite, paper.setting] + ([paper.source] if detail else [])
      rows.append((first if i == 0 else ["(as above)"] + [""] * (len(first) - 1))
                  + [f"[`{preset}`]({root}configs/{preset}.py)", ours, peak])
  header = ["published", "its setting"] + (["how the paper got it"] if detail else [])
  table = _common.markdown_table(
      header + ["subspax preset", "its setting", "compiled peak, 1 x H100"], rows)
  note = (
      "Not the same measurement: a paper's figure is the memory of a process "
      "on its GPU (or an estimate, where it says so), which includes what the "
      "CUDA context, the framework's allocator and its fragmentation take; "
      "subspax's is XLA's compiled peak per device (argument + temp + output "
      "- alias of `memory_analysis()`) from the GPU compiler for an H100 "
      "without the device, which leaves those out. The papers write GB or G "
      "without saying whether 10^9 or 2^30 bytes; subspax's GiB are 2^30. The "
      "tokens per step differ too, and the presets recompute activations in "
      "the backward pass (activation checkpointing).")
  if not detail:
    short = ("Not the same measurement: a paper's figure is a process's "
             "memory on its GPU, CUDA context and allocator included (or an "
             "estimate, where it says so), in GB or G as it writes them; "
             "subspax's is XLA's compiled peak per device from the GPU "
             "compiler for an H100 without the device, in GiB (2^30 bytes). "
             "The tokens per step differ too.")
    return "\n".join([table, "", short + " Sources and notes: [the presets "
                       "beside the published figures](docs/results.md#"
                       + _anchor(next(s.title for s in SECTIONS
                                      if s.name == f"{name}_published")) + ")."])
  return "\n".join([table, "", note, "", (
      "A preset's peak is its train step as configured (its batch, "
      "accumulation and precision), the larger of the ordinary and the "
      "refresh step. [How big a model fits on one GPU](#"
      + _anchor(next(s.title for s in SECTIONS if s.name == f"{name}_fits"))
      + ") has the methods at batch 1 x 256 with int8 kernels "
      "(`+layerwise+int8`).")])


def splice(readme: str, blocks: dict[str, str]) -> str:
  """``readme`` with the text between each pair of markers replaced."""
  for marker, block in blocks.items():
    start, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
    pattern = re.escape(start) + r"\n.*?" + re.escape(end)
    if not re.search(pattern, readme, flags=re.S):
      raise ValueError(f"the README has no {start} ... {end} markers")
    readme = re.sub(pattern, lambda _, b=block, s=start, e=end: f"{s}\n{b}\n{e}",
                    readme, flags=re.S)
  return readme


def render(out: str, readme_text: str) -> tuple[str, str]:
  """(docs/results.md, README.md) as the result files in ``out`` give them."""
  page = results_page(out).replace("](docs/results.md#", "](#")
  return page, splice(readme_text, {"summary": summary(out),
                                    "presets": presets_summary(out),
                                    "published": published_table(out)})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=_common.RESULTS,
                      help="the results directory to read")
  parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
  parser.add_argument("--page", default=os.path.join(ROOT, "docs", "results.md"))
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a file is out of date")
  args = parser.parse_args(argv)
  with open(args.readme) as f:
    readme_text = f.read()
  page, readme_new = render(args.out, readme_text)
  stale = []
  for path, text in ((args.page, page), (args.readme, readme_new)):
    old = open(path).read() if os.path.exists(path) else None
    if old == text:
      continue
    stale.append(os.path.relpath(path, ROOT))
    if not args.check:
      with open(path, "w") as f:
        f.write(text)
  if args.check:
    print("out of date: " + ", ".join(stale) if stale else "up to date")
    return 1 if stale else 0
  print("wrote " + (", ".join(stale) if stale else "nothing (up to date)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())

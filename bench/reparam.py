"""Memory and FLOPs of the GRASS sparse-gradient and RSO reparametrised modes.

For the tiny and 60M presets (and, with `--presets`, 350m or 1b) (each with its own batch, sequence, rank and
layout), five configurations of the trainer, compiled from abstract inputs
(nothing is allocated or run):

* `adamw`, plain `grass` and plain `rso` (the optax transformations),
* `grass+sparse` and `rso+reparam` (`opt.subspace_layers=True` with grass
  and rso): frozen kernels trained through r x D deltas
  (train/reparam.py).

Per configuration: the train step's `memory_analysis()` (argument, temp,
output, alias; peak = argument + temp + output - alias), its
`cost_analysis()["flops"]`, the exact optimizer-state bytes and, for the
modes, the bytes of the deltas and bases and the refresh program's memory and
FLOPs (run once every T steps). FLOP predictions per projected matrix
(m x n, projected side d, kept side D, N tokens; the forward terms count twice
with remat):

* weight gradient: 2 N m n -> 2 N r D;
* rows (GRASS, a custom VJP): total change -2 N m n + 2 N r D (the r
  delta rows are added into W before the forward product, so only the
  weight gradient changes; gathers and scatters are free);
* dense (RSO): -2 N m n + 6 N r D + 4 N r d (plus x S and its transpose),
  minus the plain transformation's 4 m n r of S^T G and S N;
* XLA counts a scanned layer loop's body once (see `predicted_flops`).

With `--time-presets` (default: tiny), also the step time of each
configuration on real arrays, interleaved over `--repeats` rounds in one
process, as a ratio to AdamW's, with the refresh program amortised over T.

With remat, XLA recomputes only the forward values the backward needs (not
the outputs of the attention-output and MLP-down projections), so the
prediction, which counts every delta product twice, bounds the change from
above.

  python -m bench.reparam                  # tiny and 60m, tiny timed
  python -m bench.reparam --presets tiny
"""

import argparse

import jax
import jax.numpy as jnp
import subspax

from bench import _common
from train import model as model_lib
from train import train as train_lib

NAME = "reparam"
CASES = {  # label -> (opt.name, opt.subspace_layers)
    "adamw": ("adamw", False),
    "grass": ("grass", False),
    "grass+sparse": ("grass", True),
    "rso": ("rso", False),
    "rso+reparam": ("rso", True),
}


def config(preset: str, name: str, subspace_layers: bool):
  cfg = _common.preset_config(preset, name, subspace_layers)
  if name == "rso":  # both RSO forms on the input side (the mode's default)
    cfg.opt.rso.side = "left"
  return cfg


def predicted_flops(cfg, programs) -> dict[str, float]:
  """Weight-gradient FLOPs and the step-FLOP change each mode should show.

  XLA's `cost_analysis()` counts a while loop's body once, so with scanned
  layers the per-layer matmul terms count once, not `n_layers` times. The
  plain RSO transformation also spends `4 m n r` per matrix on `S^T G` and
  `S N`, which the reparametrised step does not; the core computes them in a
  loop over the stacked matrices and their row blocks, so the count sees one
  block of one matrix per parameter: `4 (m / blocks) n r`.
  """
  tokens = cfg.batch_size * cfg.seq_len
  rank, layers = cfg.opt.rank, programs.model_cfg.n_layers
  in_loop = 1 if cfg.model.scan else layers
  forward = 2 if cfg.model.remat else 1
  out = {"wgrad_full": 0.0, "wgrad_reduced": 0.0, "rows_change": 0.0,
         "dense_change": 0.0}
  for m, n in programs.model_cfg.projected_dims().values():
    side_option = "left" if cfg.opt.name == "rso" else "auto"
    side = subspax.reparam.resolve_side(m, n, side_option)
    d, big_d = (m, n) if side == "left" else (n, m)
    full, reduced = 2 * tokens * m * n, 2 * tokens * rank * big_d
    out["wgrad_full"] += layers * full
    out["wgrad_reduced"] += layers * reduced
    # GRASS (custom VJP): the r delta rows are added into W (no matmul), so
    # only the weight gradient shrinks, from 2 N m n to 2 N r D.
    out["rows_change"] += in_loop * (reduced - full)
    # RSO: x W + (x S) Delta adds the delta's forward product (once per
    # forward pass) and its input gradient, and the basis products x S and
    # dh S^T; the plain transformation's S^T G and S N are gone.
    delta_products = (forward + 2) * reduced - full
    basis_products = 2 * (forward + 1) * tokens * rank * d
    block_rows = m // subspax.num_row_blocks(m)  # blocks of stored rows
    optimizer_products = 4 * block_rows * n * rank
    out["dense_change"] += in_loop * (delta_products + basis_products
                                      - optimizer_products)
  return out


def _time(preset: str, cases: dict, repeats: int) -> dict:
  """Step (and amortised refresh) time per case, interleaved, ratio to AdamW."""
  fns, intervals = {}, {}
  for label, (cfg, programs) in cases.items():
    batch = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len + 1),
                               0, cfg.data.vocab_size, jnp.int32)
    state = jax.jit(programs.init)()
    step = jax.jit(programs.train_step)
    if programs.refresh is not None:
      refresh = jax.jit(programs.refresh)
      state = refresh(state, batch)
      fns[f"{label}/refresh"] = lambda f=refresh, s=state: jax.block_until_ready(
          f(s, batch))
    state, _ = step(state, batch)  # a step after the first refresh
    fns[f"{label}/step"] = lambda f=step, s=state: jax.block_until_ready(f(s, batch))
    intervals[label] = cfg.opt.update_interval
  times = _common.interleaved(fns, repeats=repeats, warmup=1)
  ref = times["adamw/step"]
  out = {}
  for label, interval in intervals.items():
    step_t = times[f"{label}/step"]
    refresh_t = times.get(f"{label}/refresh", [0.0] * len(step_t))
    amortized = [s + r / interval for s, r in zip(step_t, refresh_t)]
    out[label] = {"step": _common.ratio_stats(step_t, ref),
                  "amortized": _common.ratio_stats(amortized, ref),
                  "seconds": _common.summary(step_t)}
    print(f"{preset} {label}: step {out[label]['step']['median']:.3f}x AdamW, "
          f"with refresh {out[label]['amortized']['median']:.3f}x", flush=True)
  return out


def measure(preset: str, time_repeats: int) -> dict:
  results, cases = {}, {}
  for label, (name, subspace_layers) in CASES.items():
    cfg = config(preset, name, subspace_layers)
    programs = train_lib.build_programs(cfg, cfg.data.vocab_size,
                                        train_lib.validate(cfg))
    cases[label] = (cfg, programs)
    state = jax.eval_shape(programs.init)
    batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
    jit = lambda f: jax.jit(f, donate_argnums=0).lower(state, batch).compile()
    compiled = jit(programs.train_step)
    weights, = model_lib.partition(programs.graphdef, state.params,
                                   model_lib.WEIGHTS)
    entry = {
        "step": _analysis(compiled),
        "opt_state_bytes": subspax.state_bytes(state.opt_state),
        "reparam_bytes": (subspax.state_bytes(state.params)
                          - subspax.state_bytes(weights)),  # deltas and bases
        "predicted": predicted_flops(cfg, programs),
        "tokens": cfg.batch_size * cfg.seq_len,
        "rank": cfg.opt.rank, "update_interval": cfg.opt.update_interval,
        "remat": cfg.model.remat, "scan": cfg.model.scan,
    }
    if programs.refresh is not None:
      entry["refresh"] = _analysis(jit(programs.refresh))
    results[label] = entry
    print(f"{preset} {label}: peak {_common.mib(entry['step']['peak']):.1f} MiB, "
          f"{entry['step']['flops'] / 1e9:.2f} GFLOP", flush=True)
  if time_repeats:
    for label, timing in _time(preset, cases, time_repeats).items():
      results[label]["time"] = timing
  return results


def _analysis(compiled) -> dict[str, float]:
  return {**_common.compiled_memory(compiled),
          "flops": compiled.cost_analysis()["flops"]}


def table(all_results: dict) -> str:
  lines = []
  for preset, results in all_results.items():
    adamw = results["adamw"]["step"]
    first = results["adamw"]
    lines.append(
        f"\n**{preset}** ({first['tokens']} tokens per step, rank {first['rank']}, "
        f"T = {first['update_interval']}, remat {first['remat']}, scan {first['scan']}); "
        "memory in MiB, ratios to AdamW, GFLOP per step:\n")
    rows = []
    timed = "time" in results["adamw"]
    for label, entry in results.items():
      step = entry["step"]
      refresh = entry.get("refresh")
      timing = ([f"{entry['time']['step']['median']:.3f} ({entry['time']['step']['min']:.3f})",
                 f"{entry['time']['amortized']['median']:.3f}"] if timed else [])
      rows.append([
          label, _common.mib(entry["opt_state_bytes"] + entry["reparam_bytes"]),
          _common.mib(step["argument"]), _common.mib(step["temp"]),
          _common.mib(step["argument"] + step["temp"]),
          f"{step['peak'] / adamw['peak']:.3f}",
          f"{step['temp'] / adamw['temp']:.3f}",
          step["flops"] / 1e9,
          "-" if refresh is None else f"{_common.mib(refresh['peak']):.1f}",
          *timing,
      ])
    time_header = (["step time x AdamW, median (min)", "with refresh / T"]
                   if timed else [])
    lines.append(_common.markdown_table(
        ["config", "opt state + deltas/bases", "argument", "temp",
         "argument + temp", "peak x AdamW", "temp x AdamW", "step GFLOP",
         "refresh peak (every T)", *time_header], rows))
    pred = results["grass"]["predicted"]
    g_change = results["grass+sparse"]["step"]["flops"] - results["grass"]["step"]["flops"]
    r_change = results["rso+reparam"]["step"]["flops"] - results["rso"]["step"]["flops"]
    pred_rso = results["rso"]["predicted"]
    lines.append(
        f"\nWeight-gradient FLOPs of the projected matrices: "
        f"{pred['wgrad_full'] / 1e9:.2f} G (full) -> {pred['wgrad_reduced'] / 1e9:.2f} G "
        f"(reduced, {pred['wgrad_full'] / pred['wgrad_reduced']:.1f}x fewer). Step FLOP "
        f"change, measured (cost_analysis) vs predicted: grass+sparse "
        f"{g_change / 1e9:+.2f} G vs {pred['rows_change'] / 1e9:+.2f} G; rso+reparam "
        f"{r_change / 1e9:+.2f} G vs {pred_rso['dense_change'] / 1e9:+.2f} G"
        + (" (with remat the prediction bounds the change from above: XLA does "
           "not recompute the outputs of the attention-output and MLP-down "
           "projections)." if first["remat"] else "."))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,60m")
  parser.add_argument("--time-presets", default="tiny",
                      help="presets whose step time is also measured")
  parser.add_argument("--repeats", type=int, default=5,
                      help="interleaved timing rounds")
  parser.add_argument("--out", default=_common.RESULTS)
  args = parser.parse_args()
  info = _common.machine()
  timed = set(args.time_presets.split(","))
  all_results = {p: measure(p, args.repeats if p in timed else 0)
                 for p in args.presets.split(",")}
  markdown = table(all_results) + "\n\n" + _common.machine_line(info)
  record = _common.call_record(args)
  payload = _common.with_call({"benchmark": NAME, "machine": info,
                               "args": record["args"], "results": all_results},
                              None, record)
  _common.write_results(NAME, payload, markdown, args.out)


if __name__ == "__main__":
  main()

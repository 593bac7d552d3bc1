"""Layer-wise updates vs the ordinary step: time and compiled memory.

What it measures: for the tiny preset (configs/tiny.py) and the LLaMA-60M
preset (configs/llama_60m.py), scanned layers, and each method, the trainer's
train step (`train.train.build_programs`) in two forms:

* `ordinary`: `value_and_grad` of the whole model, then one `tx.update`;
* `layerwise`: `opt.layerwise=True` (train/layerwise.py), each layer updated
  inside the backward scan.

Both are jitted with the state donated, as the trainer does, and timed
round-robin (`--repeats` rounds, one warm-up call each, compile excluded) on
one random token batch; a step that is not a refresh (`opt.update_interval`
is set beyond the timed steps). The table gives each method's layer-wise
time as a ratio to its ordinary step in the same round (median and min over
rounds), and both steps' compiled peaks (argument + temp + output - alias,
`train.memory.compiled_memory`).

Defaults per preset (PRESETS): tiny at its own batch (8 x 256), 60M at batch
2 x 256 (one 60M step takes seconds on a 2-core CPU), 5 rounds each.

  python -m bench.layerwise
  python -m bench.layerwise --presets tiny --methods adamw,subtrack --repeats 3
"""

import argparse
import importlib

import jax
import jax.numpy as jnp

from bench import _common
from train import memory as memory_lib
from train import train as train_lib

NAME = "layerwise"
# preset -> (config module, default batch (0: the preset's), default rounds)
PRESETS = {"tiny": ("configs.tiny", 0, 5), "60m": ("configs.llama_60m", 2, 5)}
MODES = ("ordinary", "layerwise")


def _step(cfg, mode: str, tokens: jax.Array):
  """The compiled, donated step of one mode and a state to start it from."""
  cfg = cfg.copy_and_resolve_references()
  cfg.opt.layerwise = mode == "layerwise"
  programs = train_lib.build_programs(cfg, cfg.data.vocab_size)
  state = jax.jit(programs.init)()
  compiled = jax.jit(programs.train_step, donate_argnums=0).lower(
      state, tokens).compile()
  state, _ = compiled(state, tokens)  # step 0 (the initial bases) is not timed
  return compiled, state


def bench_preset(preset: str, args) -> dict:
  module, default_batch, default_repeats = PRESETS[preset]
  cfg = importlib.import_module(module).get_config()
  cfg.model.scan = True
  cfg.batch_size = args.batch or default_batch or cfg.batch_size
  cfg.steps = 10_000
  cfg.opt.update_interval = 10_000  # no refresh among the timed steps
  tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len + 1),
                              0, cfg.data.vocab_size, jnp.int32)
  fns, peaks, states = {}, {}, {}
  for name in args.methods:
    cfg.opt.name = name
    for mode in MODES:
      compiled, states[name, mode] = _step(cfg, mode, tokens)
      peaks[f"{name}/{mode}"] = memory_lib.compiled_memory(compiled)["peak"]

      def call(c=compiled, key=(name, mode)):
        states[key], metrics = c(states[key], tokens)
        jax.block_until_ready(metrics)
      fns[f"{name}/{mode}"] = call
    print(f"{preset} {name}: compiled", flush=True)
  times = _common.interleaved(fns, repeats=args.repeats or default_repeats, warmup=1)
  ratios = {name: _common.ratio_stats(times[f"{name}/layerwise"],
                                      times[f"{name}/ordinary"])
            for name in args.methods}
  for name, r in ratios.items():
    print(f"{preset} {name}: layerwise {r['median']:.3f}x the ordinary step",
          flush=True)
  return {"preset": preset, "batch": cfg.batch_size, "seq_len": cfg.seq_len,
          "rank": cfg.opt.rank, "repeats": args.repeats or default_repeats,
          "seconds": {k: _common.summary(v) for k, v in times.items()},
          "peak_bytes": peaks, "layerwise_vs_ordinary": ratios}


def table(results, info) -> str:
  lines = [
      "Layer-wise step (`opt.layerwise=True`) vs the ordinary step of the same "
      "method, scanned layers, state donated, no refresh: time ratio median "
      "(min) over interleaved rounds, and each step's compiled peak "
      "(argument + temp + output - alias) in MiB.", ""]
  for res in results:
    rows = []
    for name, r in res["layerwise_vs_ordinary"].items():
      sec = lambda mode: res["seconds"][f"{name}/{mode}"]["median"]
      peak = lambda mode: res["peak_bytes"][f"{name}/{mode}"]
      rows.append([name, f"{sec('ordinary'):.3f}", f"{sec('layerwise'):.3f}",
                   f"{r['median']:.3f} ({r['min']:.3f})",
                   f"{_common.mib(peak('ordinary')):.1f}",
                   f"{_common.mib(peak('layerwise')):.1f}",
                   f"{peak('layerwise') / peak('ordinary'):.3f}"])
    lines += [
        f"**{res['preset']}** (batch {res['batch']} x seq {res['seq_len']}, rank "
        f"{res['rank']}; {res['repeats']} rounds)", "",
        _common.markdown_table(
            ["method", "ordinary s", "layerwise s", "time x ordinary",
             "ordinary peak", "layerwise peak", "peak x ordinary"], rows), ""]
  lines.append(_common.machine_line(info))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,60m")
  parser.add_argument("--methods", default="adamw,galore,subtrack,grassjump,grass,apollo")
  parser.add_argument("--repeats", type=int, default=0,
                      help="rounds per preset (0: the preset's default, PRESETS)")
  parser.add_argument("--batch", type=int, default=0,
                      help="batch size for every preset (0: the preset's default)")
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help=f"keep the presets saved in <out>/{NAME}.partial.json")
  args = parser.parse_args()
  args.methods = args.methods.split(",")
  _common.run_presets(NAME, args, bench_preset, table)


if __name__ == "__main__":
  main()

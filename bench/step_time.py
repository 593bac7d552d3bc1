"""Step time: the whole train step per method, refresh amortised, vs AdamW.

What it measures: for the tiny preset (configs/tiny.py) and the LLaMA-60M
preset (configs/llama_60m.py), the trainer's own step
(`train.train.make_train_step`, with `train.model` and the optimizer from
the trainer's registry `train.optimizers`, paper defaults at the preset's rank
and refresh interval T) is jitted once per method and timed on a random token
batch of the preset's shape:

* `plain`: a step that is not a refresh (optimizer counts = 1);
* `refresh`: a refresh step that is not the first (every `count` in the
  optimizer state and the train step set to T; the basis is the one step 0
  produced);
* `amortized` = (refresh + (T - 1) * plain) / T, the average step over one
  refresh interval; AdamW has no refresh, so its amortized time is its plain
  time.

All calls of one preset are timed round-robin over methods (`--repeats`
rounds, one warm-up call each, compile excluded), and ratios are per round to
AdamW's plain step in the same round; the table gives median (min) over
rounds. The state is not donated (the same state is reused for every call).
Layers are unrolled (`model.scan=False`) because optax.contrib.galore cannot
project scanned kernels.

Defaults per preset (PRESETS): tiny at its own batch (8 x 256) over 5 rounds;
60M at batch 8 x 256 (half the preset's 16) over 3 rounds, because one 60M
step (bf16 compute, remat) takes tens of seconds on a 2-core CPU and 15 calls
per round would otherwise take over half an hour. `--batch` / `--repeats`
override both presets.

  python -m bench.step_time
  python -m bench.step_time --presets tiny --methods adamw,subtrack --repeats 3
"""

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import _common
from train import model as model_lib
from train import optimizers
from train import train as train_lib

NAME = "step_time"
# preset -> (config module, default batch (0: the preset's), default rounds)
PRESETS = {"tiny": ("configs.tiny", 0, 5), "60m": ("configs.llama_60m", 8, 3)}


def with_count(tree, value: int):
  """Sets every scalar int leaf named `count` (optimizer step counters)."""
  def set_count(path, leaf):
    last = path[-1] if path else None
    name = getattr(last, "name", getattr(last, "key", None))
    if name == "count" and getattr(leaf, "ndim", None) == 0:
      return jnp.asarray(value, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(set_count, tree)


def bench_preset(preset: str, args) -> dict:
  module, default_batch, default_repeats = PRESETS[preset]
  cfg = importlib.import_module(module).get_config()
  cfg.model.scan = False
  batch_size = args.batch or default_batch or cfg.batch_size
  repeats = args.repeats or default_repeats
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  graphdef, _, _ = model_lib.abstract_model(model_cfg)
  params = jax.jit(model_lib.init_params, static_argnums=(0, 1))(model_cfg, cfg.seed)
  n_params = model_lib.count_params(model_cfg)
  tokens = jax.random.randint(jax.random.key(0), (batch_size, cfg.seq_len + 1), 0,
                              model_cfg.vocab_size, jnp.int32)
  rank, interval = cfg.opt.rank, cfg.opt.update_interval
  fns, compile_s = {}, {}
  for name in args.methods:
    opt_cfg = _common.opt_config(name, rank=rank, update_interval=interval)
    tx = optimizers.build(opt_cfg, cfg.steps, cfg.seed)
    lr = optimizers.schedule(opt_cfg, cfg.steps)
    step = jax.jit(train_lib.make_train_step(graphdef, tx, lr))
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s[name] = time.perf_counter() - start
    state, _ = jax.block_until_ready(compiled(state, tokens))  # step 0: initial basis
    plain = with_count(state, 1)._replace(step=jnp.asarray(1, jnp.int32))
    fns[f"{name}/plain"] = lambda c=compiled, s=plain: jax.block_until_ready(
        c(s, tokens))
    if name != "adamw":
      refresh = with_count(state, interval)._replace(
          step=jnp.asarray(interval, jnp.int32))
      fns[f"{name}/refresh"] = lambda c=compiled, s=refresh: jax.block_until_ready(
          c(s, tokens))
    print(f"{preset} {name}: compiled in {compile_s[name]:.1f} s", flush=True)
  times = _common.interleaved(fns, repeats=repeats, warmup=1)
  ref = times["adamw/plain"]
  ratios = {}
  for name in args.methods:
    p = times[f"{name}/plain"]
    r = times.get(f"{name}/refresh", p)
    amort = [(ri + (interval - 1) * pi) / interval for ri, pi in zip(r, p)]
    ratios[name] = {"plain": _common.ratio_stats(p, ref),
                    "refresh": _common.ratio_stats(r, ref),
                    "amortized": _common.ratio_stats(amort, ref)}
    print(f"{preset} {name}: plain {ratios[name]['plain']['median']:.3f}x, "
          f"refresh {ratios[name]['refresh']['median']:.2f}x, amortized "
          f"{ratios[name]['amortized']['median']:.3f}x", flush=True)
  return {"preset": preset, "params": n_params, "batch": batch_size,
          "repeats": repeats,
          "seq_len": cfg.seq_len, "rank": rank, "update_interval": interval,
          "vocab": model_cfg.vocab_size, "remat": model_cfg.remat,
          "compute_dtype": model_cfg.dtype, "compile_s": compile_s,
          "seconds": {k: _common.summary(v) for k, v in times.items()},
          "vs_adamw": ratios}


def table(results, args, info) -> str:
  lines = [
      f"Whole train step (forward, backward, optimizer) as a ratio to AdamW's "
      f"step in the same round: median (min) over the interleaved rounds "
      f"(number per preset below). plain = non-refresh step, refresh = a (non-initial) refresh "
      f"step, amortized = (refresh + (T-1) plain) / T. Random tokens, state "
      f"not donated, unrolled layers.", ""]
  fmt = lambda s: f"{s['median']:.3f} ({s['min']:.3f})"
  for res in results:
    rows = []
    for name, r in res["vs_adamw"].items():
      rows.append([name, f"{res['seconds'][name + '/plain']['median']:.3f}",
                   fmt(r["plain"]), fmt(r["refresh"]) if name != "adamw" else "-",
                   fmt(r["amortized"]), f"{res['compile_s'][name]:.0f}"])
    lines += [
        f"**{res['preset']}** ({res['params'] / 1e6:.1f}M params, batch "
        f"{res['batch']} x seq {res['seq_len']}, vocab {res['vocab']}, "
        f"{res['compute_dtype']} compute, remat {res['remat']}; rank "
        f"{res['rank']}, T = {res['update_interval']}; "
        f"{len(res['seconds']['adamw/plain']['all'])} rounds)", "",
        _common.markdown_table(
            ["method", "plain step s (median)", "plain x AdamW",
             "refresh x AdamW", "amortized x AdamW", "compile s"], rows), ""]
  lines.append(_common.machine_line(info))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,60m")
  parser.add_argument("--methods", default=",".join(_common.METHODS))
  parser.add_argument("--repeats", type=int, default=0,
                      help="rounds per preset (0: the preset's default, PRESETS)")
  parser.add_argument("--batch", type=int, default=0,
                      help="batch size for every preset (0: the preset's "
                           "default, PRESETS)")
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the presets saved in <out>/step_time.partial.json")
  args = parser.parse_args()
  args.methods = args.methods.split(",")
  if args.methods[0] != "adamw":
    args.methods = ["adamw"] + [m for m in args.methods if m != "adamw"]
  info = _common.machine()
  partial = _common.Partial(args.out, NAME, resume=args.resume)
  results = [partial.get_or_run(preset, lambda preset=preset: bench_preset(preset, args))
             for preset in args.presets.split(",")]
  record = _common.call_record(args, presets={
      r["preset"]: {"batch": r["batch"], "seq_len": r["seq_len"]}
      for r in results})
  payload = _common.with_call({"benchmark": NAME, "machine": info,
                               "args": record["args"], "results": results},
                              None, record)
  _common.write_results(NAME, payload, table(results, args, info), args.out)
  partial.remove()


if __name__ == "__main__":
  main()

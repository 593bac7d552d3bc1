"""Memory: exact optimizer-state bytes and the compiled train step's memory.

What it measures, for the LLaMA 60M / 130M / 350M / 1B shapes of
configs/llama_*.py (vocab 32000, bf16 compute on float32 master weights,
rematerialised blocks) and each method at the preset's rank (128 / 256 / 256 /
512) and refresh interval, every optimizer built by the trainer's registry
(train/optimizers.py, paper defaults):

* state bytes, exact: `subspax.state_bytes(jax.eval_shape(tx.init, params))`,
  for all parameters and for the projected matrices only (the same
  `tx.init` on a parameter tree holding only the leaves the default routing
  projects: the attention and MLP kernels; AdamW's row is then its m and v of
  those same matrices);
* the compiled train step: `train.train.make_train_step` under
  `jax.jit(..., donate_argnums=0)`, lowered with abstract inputs
  (`jax.ShapeDtypeStruct`; nothing is allocated) and a batch of 1 x 256 tokens,
  and its `compiled.memory_analysis()`: argument, temp, output and alias
  (donated) sizes. Peak = argument + temp + (output - alias): the inputs stay
  live, the compiler's scratch is `temp`, and only outputs that are not written
  into a donated input buffer need new memory. (`argument + temp`, what the
  trainer prints, is in the JSON too.)
* an analytic floor per size: weights (f32) + gradients (f32) + the reduced
  optimizer state of SubTrack++ (exact bytes) + activations, with activations
  estimated for remat'd blocks at batch B, sequence S:
  2 L B S D (each block's bf16 input, saved by remat)
  + 2 B S (6 D + 3 F) (one block recomputed in the backward pass, bf16)
  + 4 B H S^2 (its float32 attention probabilities)
  + 8 B S V (float32 logits and their gradient).

Layouts: unrolled layers (`model.scan=False`, what the trainer needs for
optax.contrib.galore, which cannot project scanned (L, in, out) kernels) and
the presets' own scanned layers (`SIZE:scan`; optax_galore skipped there).
Unrolled compiles of a subspax method are slow on this 2-core CPU: 20-85 s
each at 60M/130M and about 2 minutes at 350M/1B on an idle machine, 2-4x that
under load, while AdamW, optax_galore and every scanned compile take seconds.
So by default (about 15 minutes on an idle machine): 60M and 130M unrolled with every method (the only sizes where
every method sits next to optax_galore in one layout); 350M and 1B unrolled
with AdamW, optax_galore and SubTrack++ only, and scanned with AdamW and every
subspax method. Ratios are to AdamW of the same size and layout and, for
peaks, to optax_galore of the same size and layout (hence '-' in scanned
tables).

  python -m bench.memory                          # the default set above
  python -m bench.memory --sizes 60m --methods adamw,subtrack
"""

import argparse
import importlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import subspax

from bench import _common
from train import model as model_lib
from train import optimizers
from train import train as train_lib

NAME = "memory"
SIZES = ("60m", "130m", "350m", "1b")


def preset(size: str):
  return importlib.import_module(f"configs.llama_{size}").get_config()


def projected_only(params: dict, rank: int) -> dict:
  """The sub-tree of the leaves the default routing projects."""
  def keep(node):
    if isinstance(node, dict):
      kept = {k: keep(v) for k, v in node.items()}
      return {k: v for k, v in kept.items() if v is not None and v != {}}
    return node if subspax.default_is_projected(node.shape, rank) else None
  return keep(params)


def activation_bytes(m: model_lib.LlamaConfig, batch: int, seq: int) -> dict:
  b, s, d, f, v, h, layers = (batch, seq, m.d_model, m.d_ff, m.vocab_size,
                              m.n_heads, m.n_layers)
  parts = {
      "saved_block_inputs": 2 * layers * b * s * d,
      "one_block_recomputed": 2 * b * s * (6 * d + 3 * f),
      "attention_probs": 4 * b * h * s * s,
      "logits_and_grad": 8 * b * s * v,
  }
  parts["total"] = sum(parts.values())
  return parts


def parse_spec(spec: str, methods: list[str]) -> tuple[str, bool, list[str]]:
  """'SIZE[:scan][@m1+m2+...]' -> (size, scanned, methods)."""
  spec, _, only = spec.partition("@")
  size, _, layout = spec.partition(":")
  if layout not in ("", "scan"):
    raise ValueError(f"--sizes entry {spec!r}: the layout must be ':scan' or absent")
  chosen = only.split("+") if only else methods
  return size, layout == "scan", [m for m in chosen if m in methods]


def measure(spec: str, methods: list[str], args, partial: dict,
            save: callable) -> dict:
  size, scan, methods = parse_spec(spec, methods)
  cfg = preset(size)
  cfg.model.scan = scan
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  graphdef, params, _ = model_lib.abstract_model(model_cfg)
  rank, interval = cfg.opt.rank, cfg.opt.update_interval
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  proj = projected_only(params, rank)
  n_proj = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(proj))
  batch = jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)
  out = {"size": size, "rank": rank, "update_interval": interval,
         "scan": cfg.model.scan, "params": n_params, "projected_params": n_proj,
         "model": {k: getattr(model_cfg, k) for k in (
             "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "dtype",
             "param_dtype", "remat", "scan")},
         "methods": {}}
  for name in methods:
    if name == "optax_galore" and cfg.model.scan:
      print(f"{size} {name}: skipped (scanned layers)", flush=True)
      continue
    key = f"{size}|{'scan' if scan else 'unrolled'}|{name}|{args.batch}x{args.seq}"
    if key in partial:
      out["methods"][name] = partial[key]
      print(f"{key}: from the partial results", flush=True)
      continue
    opt_cfg = _common.opt_config(name, rank=rank, update_interval=interval)
    tx = optimizers.build(opt_cfg, cfg.steps, cfg.seed)
    lr = optimizers.schedule(opt_cfg, cfg.steps)
    opt_state = jax.eval_shape(tx.init, params)
    state = train_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                 opt_state)
    step = jax.jit(train_lib.make_train_step(graphdef, tx, lr), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "alias", "temp")}
    mem["peak"] = mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
    mem["argument_plus_temp"] = mem["argument"] + mem["temp"]
    out["methods"][name] = partial[key] = {
        "state_bytes": subspax.state_bytes(opt_state),
        "projected_state_bytes": subspax.state_bytes(jax.eval_shape(tx.init, proj)),
        "compiled": mem, "compile_s": compile_s,
    }
    save()
    print(f"{key}: state {_common.mib(out['methods'][name]['state_bytes']):.1f}"
          f" MiB, peak {_common.mib(mem['peak']):.1f} MiB, temp "
          f"{_common.mib(mem['temp']):.1f} MiB (compile {compile_s:.1f} s)",
          flush=True)
  act = activation_bytes(model_cfg, args.batch, args.seq)
  reduced = out["methods"].get("subtrack", {}).get("state_bytes")
  if reduced is None:  # floor needs SubTrack++'s state even if not compiled
    reduced = subspax.state_bytes(jax.eval_shape(_common.build_tx(
        "subtrack", rank=rank, update_interval=interval).init, params))
  out["floor"] = {"weights": 4 * n_params, "grads": 4 * n_params,
                  "reduced_state": reduced, "activations": act}
  out["floor"]["total"] = 8 * n_params + reduced + act["total"]
  return out


def table(results: list[dict], args) -> str:
  lines = [
      f"Batch {args.batch} x seq {args.seq}; float32 weights and states, bf16 "
      f"compute, remat on. State = exact optimizer-state bytes; 'projected' = "
      f"the attention and MLP kernels only. Peak = argument + temp + output - "
      f"alias of the compiled, donated train step (compiler estimate). Floor = "
      f"weights + grads + SubTrack++'s reduced state + estimated activations "
      f"(formula in bench/memory.py). All in MiB; 'x' columns are ratios.", ""]
  for res in results:
    ms = res["methods"]
    ref = ms.get("adamw")
    og = ms.get("optax_galore")
    rows = []
    for name, m in ms.items():
      c = m["compiled"]
      rows.append([
          name + (" †" if m.get("subspax_core") else ""), f"{_common.mib(m['state_bytes']):.1f}",
          m["state_bytes"] / ref["state_bytes"] if ref else "-",
          f"{_common.mib(m['projected_state_bytes']):.1f}",
          m["projected_state_bytes"] / ref["projected_state_bytes"] if ref else "-",
          f"{_common.mib(c['argument']):.0f}", f"{_common.mib(c['temp']):.0f}",
          f"{_common.mib(c['output'] - c['alias']):.1f}",
          f"{_common.mib(c['peak']):.0f}",
          c["peak"] / ref["compiled"]["peak"] if ref else "-",
          c["peak"] / og["compiled"]["peak"] if og else "-",
      ])
    fl = res["floor"]
    rows.append([
        "floor (analytic)", f"{_common.mib(fl['reduced_state']):.1f}",
        fl["reduced_state"] / ref["state_bytes"] if ref else "-", "", "",
        f"{_common.mib(fl['weights'] + fl['reduced_state']):.0f}",
        f"{_common.mib(fl['grads'] + fl['activations']['total']):.0f}", "",
        f"{_common.mib(fl['total']):.0f}",
        fl["total"] / ref["compiled"]["peak"] if ref else "-",
        fl["total"] / og["compiled"]["peak"] if og else "-"])
    lines += [
        f"**LLaMA {res['size']}** ({res['params'] / 1e6:.0f}M params, "
        f"{res['projected_params'] / 1e6:.0f}M in projected matrices; rank "
        f"{res['rank']}, refresh every {res['update_interval']}; "
        f"{'scanned' if res['scan'] else 'unrolled'} layers)", "",
        _common.markdown_table(
            ["method", "state", "x AdamW", "projected state", "x AdamW",
             "argument", "temp", "output-alias", "peak", "peak x AdamW",
             "peak x optax_galore"], rows), ""]
  if any(m.get("subspax_core") for res in results for m in res["methods"].values()):
    lines += ["† compiled with subspax before commit 357705c (refresh moved into "
              "one lax.map under one cond), reused from an earlier run to save "
              "about an hour of unrolled compiles. With one matrix per leaf "
              "(unrolled layers) that change should not move these numbers; the "
              "60M rows, recompiled after it, match the earlier run (see the "
              "JSON's `reused_check`).", ""]
  return "\n".join(lines)


DEFAULT_SIZES = ("60m,130m,350m@adamw+optax_galore+subtrack,350m:scan,"
                 "1b@adamw+optax_galore+subtrack,1b:scan")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--sizes", default=DEFAULT_SIZES,
      help="comma-separated 'SIZE[:scan][@m1+m2+...]': ':scan' compiles with "
           "scanned layers, '@...' restricts the methods for that entry")
  parser.add_argument("--methods", default=",".join(_common.METHODS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="reuse compiles saved in <out>/memory.partial.json")
  parser.add_argument("--compare", default="",
                      help="a partial JSON of an earlier run: record in the "
                           "results how this run's fresh compiles compare")
  args = parser.parse_args()
  methods = args.methods.split(",")
  info = _common.machine()
  os.makedirs(args.out, exist_ok=True)
  partial_path = os.path.join(args.out, f"{NAME}.partial.json")
  partial = {}
  if args.resume and os.path.exists(partial_path):
    with open(partial_path) as f:
      partial = json.load(f)
  reused = set(partial)

  def save():
    with open(partial_path, "w") as f:
      json.dump(partial, f, indent=1)

  results = [measure(spec, methods, args, partial, save)
             for spec in args.sizes.split(",")]
  payload = {"benchmark": NAME, "machine": info, "args": vars(args),
             "results": results}
  if args.compare:
    with open(args.compare) as f:
      earlier = json.load(f)
    payload["reused_check"] = {
        key: {"this_run": {k: partial[key]["compiled"][k] for k in ("peak", "temp")}
              | {"state_bytes": partial[key]["state_bytes"]},
              "earlier": {k: earlier[key]["compiled"][k] for k in ("peak", "temp")}
              | {"state_bytes": earlier[key]["state_bytes"]}}
        for key in partial if key in earlier and key not in reused}
    for key, v in payload["reused_check"].items():
      print(f"{key}: this run {v['this_run']}, earlier {v['earlier']}", flush=True)
  markdown = table(results, args) + "\n" + _common.machine_line(info)
  _common.write_results(NAME, payload, markdown, args.out)
  os.remove(partial_path)


if __name__ == "__main__":
  main()

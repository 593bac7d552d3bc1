"""Memory: exact optimizer-state bytes, the compiled train step, what fits.

What it measures, for the LLaMA 60M / 130M / 350M / 1B / 7B / 13B shapes of
configs/llama_*.py (vocab 32000, bf16 compute on float32 master weights,
rematerialised blocks) and each method at the preset's rank (128 / 256 / 256 /
512 / 1024 / 1024) and refresh interval, every optimizer built by the
trainer's registry (train/optimizers.py, paper defaults):

* state bytes, exact: `subspax.state_bytes(jax.eval_shape(tx.init, params))`,
  for all parameters and for the projected matrices only (the same
  `tx.init` on a parameter tree holding only the leaves the default routing
  projects: the attention and MLP kernels; AdamW's row is then its m and v of
  those same matrices);
* the compiled train step, through the trainer's dry run
  (`train.dry_run.dry_run`: the train step `python -m train` compiles, jitted
  with the state donated and lowered from abstract shapes, so nothing is
  allocated) on one device with a batch of 1 x 256 tokens, and its
  `memory_analysis()`: argument, temp, output and alias (donated) sizes.
  Peak = argument + temp + output - alias (`train.memory.compiled_memory`,
  the definition the trainer prints too): the inputs stay live, the
  compiler's scratch is `temp`, and only outputs that are not written into a
  donated input buffer need new memory;
* an analytic floor per size: weights (f32) + gradients (f32) + the reduced
  optimizer state of SubTrack++ (exact bytes) + activations, with activations
  estimated for remat'd blocks at batch B, sequence S:
  2 L B S D (each block's bf16 input, saved by remat)
  + 2 B S (6 D + 3 F) (one block recomputed in the backward pass, bf16)
  + 4 B H S^2 (its float32 attention probabilities)
  + 8 B S V (float32 logits and their gradient);
* what fits (`--fits`, default 24, 40 and 80 GiB): for AdamW and every
  subspax method, the largest preset whose compiled step (scanned layers,
  same batch) has a peak within each budget. bench/readme.py renders it.

Layouts: unrolled layers (`model.scan=False`, what the trainer needs for
optax.contrib.galore, which cannot project scanned (L, in, out) kernels) and
the presets' own scanned layers (`SIZE:scan`; optax_galore skipped there).
Unrolled compiles of a subspax method are slow on this 2-core CPU: 20-85 s
each at 60M/130M and about 2 minutes at 350M/1B on an idle machine, 2-4x that
under load, while AdamW, optax_galore and every scanned compile take seconds
(7B and 13B scanned: 15-40 s each). So by default: 60M and 130M unrolled with
every method (the only sizes where every method sits next to optax_galore in
one layout); 350M and 1B unrolled with AdamW, optax_galore and SubTrack++
only, and scanned with AdamW and every subspax method; 7B scanned with every
method; and the what-fits table. Ratios are to AdamW of the same size and
layout and, for peaks, to optax_galore of the same size and layout (hence '-'
in scanned tables).

  python -m bench.memory                          # the default set above
  python -m bench.memory --sizes 60m --methods adamw,subtrack --fits ''
  python -m bench.memory --sizes 7b:scan,13b:scan --merge   # re-measure the big
      # presets and the fits table, keep the other sizes of bench/results/memory.json
  python -m bench.memory --target h100 --merge --sizes '' --presets '' \
      --fits 12,16,24,40,80 --fit_variants layerwise+int8 \
      --fit_methods subtrack,apollo_mini   # add only these fits rows
"""

import argparse
import importlib
import os

import jax
import numpy as np
import subspax

from bench import _common
from train import dry_run
from train import targets
from train import model as model_lib
from train import optimizers

NAME = "memory"
SIZES = ("60m", "130m", "350m", "1b", "7b", "13b")  # configs/llama_<size>.py, growing
# optax_galore cannot project scanned kernels: no what-fits row for it.
FIT_METHODS = tuple(m for m in _common.METHODS if m != "optax_galore")


def preset(size: str):
  return importlib.import_module(f"configs.llama_{size}").get_config()


def projected_only(params: dict, rank: int) -> dict:
  """The sub-tree of the leaves the trainer projects (`optimizers.is_projected`)."""
  def keep(path, node):
    if isinstance(node, dict):
      kept = {k: keep(path + (jax.tree_util.DictKey(k),), v) for k, v in node.items()}
      return {k: v for k, v in kept.items() if v is not None and v != {}}
    return node if optimizers.is_projected(path, node, rank) else None
  return keep((), params)


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


# Every weight and optimizer state in 2 bytes.
LAYERWISE_BF16 = {"opt.layerwise": True, "model.param_dtype": "bfloat16",
                  "opt.mu_dtype": "bfloat16", "opt.nu_dtype": "bfloat16",
                  "opt.basis_dtype": "bfloat16"}
# `configs.base.memory_saving` as overrides: also the method's reduced moments in
# 8 bits ("{method}": the section of the method compiled; AdamW has none).
MEMORY_SAVING = {**LAYERWISE_BF16, "opt.{method}.quantize_moments": "quantile"}
# What-fits variants: config overrides on top of a preset (`--fit_variants`).
VARIANTS = {
    "plain": {},
    "layerwise": {"opt.layerwise": True},
    "layerwise+bf16": LAYERWISE_BF16,
    # The memory-saving precision with the blocks' kernels in int8
    # (configs/llama_7b_16gb.py's recipe).
    "layerwise+int8": {**MEMORY_SAVING, "model.kernel_format": "int8"},
}


def variant_overrides(variant: str, name: str) -> dict:
  """`VARIANTS[variant]` for method `name`: "{method}" keys name its section;
  AdamW has no method section (those keys are dropped) and no basis."""
  out = {}
  for key, value in VARIANTS[variant].items():
    if "{method}" in key:
      if name not in subspax.METHODS:
        continue
      key = key.format(method=name)
    out[key] = value
  if name == "adamw" and "opt.basis_dtype" in out:
    out["opt.basis_dtype"] = "float32"  # (unused by adamw)
  return out
# The memory-saving presets, dry-run as they are (`--presets`); a preset with
# an N-device mesh (llama_70b_8x80gb: fsdp 8) compiles for N of the target.
PRESETS = ("llama_7b_12gb", "llama_7b_16gb", "llama_7b_24gb", "llama_7b_2k_24gb",
           "llama_13b_24gb", "llama_13b_40gb", "llama_70b_8x80gb")
# AdamW in the shapes, batch and mesh of a preset: what it would need without
# subspax (float32 weights and moments, one gradient of the whole model).
ADAMW_OF_PRESET = {"opt.name": "adamw", "opt.layerwise": False,
                   "opt.subspace_layers": False, "model.param_dtype": "float32",
                   "model.kernel_format": "float",
                   "opt.mu_dtype": "float32", "opt.nu_dtype": "float32"}


def compile_case(size: str, scan: bool, name: str, args,
                 variant: str = "plain") -> dict:
  """One method's train step at one size and layout, through the trainer's dry
  run (train/dry_run.py: abstract shapes, nothing allocated); `variant`: a
  key of `VARIANTS`."""
  cfg = preset(size)
  cfg.opt.name = name
  cfg.model.scan = scan
  cfg.batch_size, cfg.seq_len = args.batch, args.seq
  cfg.mesh.data = 1  # one device: the per-device peak of an unsharded run
  cfg.update_from_flattened_dict(variant_overrides(variant, name))
  record = dry_run.dry_run(cfg, getattr(args, "target", ""))
  mem = dry_run.run_sizes(record)  # the larger of the ordinary and refresh steps
  mem["argument_plus_temp"] = mem["argument"] + mem["temp"]
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, record["vocab_size"])
  proj = projected_only(model_lib.abstract_model(model_cfg)[1], cfg.opt.rank)
  tx = optimizers.build(cfg.opt, cfg.steps, cfg.seed)
  return {"state_bytes": record["state_bytes"],
          "projected_state_bytes": subspax.state_bytes(jax.eval_shape(tx.init, proj)),
          "compiled": mem, "compile_s": record["compile_s"]}


def cached_case(size: str, scan: bool, name: str, args,
                partial: _common.Partial, variant: str = "plain") -> dict:
  """`compile_case`, or its earlier result in `partial` (saved after each)."""
  key = f"{size}|{'scan' if scan else 'unrolled'}|{name}|{args.batch}x{args.seq}"
  key += "" if variant == "plain" else f"|{variant}"
  if key in partial.cases:
    print(f"{key}: from the partial results", flush=True)
    return partial.cases[key]
  case = partial.get_or_run(key, lambda: compile_case(size, scan, name, args,
                                                      variant))
  print(f"{key}: state {_common.mib(case['state_bytes']):.1f} MiB, peak "
        f"{_common.mib(case['compiled']['peak']):.1f} MiB, temp "
        f"{_common.mib(case['compiled']['temp']):.1f} MiB (compile "
        f"{case['compile_s']:.1f} s)", flush=True)
  return case


def measure(spec: str, methods: list[str], args,
            partial: _common.Partial) -> dict:
  size, scan, methods = parse_spec(spec, methods)
  cfg = preset(size)
  cfg.model.scan = scan
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  params = model_lib.abstract_model(model_cfg)[1]
  rank, interval = cfg.opt.rank, cfg.opt.update_interval
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  proj = projected_only(params, rank)
  n_proj = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(proj))
  out = {"size": size, "rank": rank, "update_interval": interval,
         "scan": cfg.model.scan, "params": n_params, "projected_params": n_proj,
         "measured": _common.machine()["date"],
         "model": {k: getattr(model_cfg, k) for k in (
             "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "dtype",
             "param_dtype", "remat", "scan")},
         "methods": {}}
  for name in methods:
    if name == "optax_galore" and cfg.model.scan:
      print(f"{size} {name}: skipped (scanned layers)", flush=True)
      continue
    out["methods"][name] = cached_case(size, scan, name, args, partial)
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
        f"{'scanned' if res['scan'] else 'unrolled'} layers"
        + (f"; measured {res['measured']}" if res.get("measured") else "") + ")", "",
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


def what_fits(budgets_gib: list[float], methods: list[str], args,
              partial: _common.Partial, variants: tuple[str, ...] = ("plain",)
              ) -> dict:
  """Per method, variant and budget, the largest preset whose step fits.

  Scanned layers (the presets' layout). For each budget the presets are tried
  from the largest down, compiling only what the answer needs (a preset's peak
  grows with its size); every compile is cached in `partial`, so the table
  rows of the same run are reused.

  Returns:
    {'budgets_gib', 'sizes', 'batch', 'seq', 'measured', 'variants',
    'peaks': {row: {size: peak bytes}}, 'largest': {row: {budget: size or
    None}}}; a row is the method's name, then '+' and the variant unless it
    is "plain" (e.g. "subtrack+layerwise+bf16").
  """
  peaks, largest = {}, {}
  for variant in variants:
    for name in methods:
      row = name if variant == "plain" else f"{name}+{variant}"
      peaks[row], largest[row] = {}, {}
      for gib in budgets_gib:
        largest[row][str(gib)] = None
        for size in reversed(SIZES):
          if size not in peaks[row]:
            case = cached_case(size, True, name, args, partial, variant)
            peaks[row][size] = case["compiled"]["peak"]
          if peaks[row][size] <= gib * 2**30:
            largest[row][str(gib)] = size
            break
  return {"budgets_gib": budgets_gib, "sizes": list(SIZES), "batch": args.batch,
          "seq": args.seq, "measured": _common.machine()["date"],
          "variants": {v: VARIANTS[v] for v in variants},
          "peaks": {n: {s: p[s] for s in SIZES if s in p} for n, p in peaks.items()},
          "largest": largest}


def preset_devices(cfg) -> int:
  """How many devices a preset's mesh names (a `-1` axis takes what is left:
  counted as 1)."""
  return int(np.prod([max(int(cfg.mesh[a]), 1) for a in ("data", "fsdp", "tensor")]))


def dry_run_presets(names: list[str], partial: _common.Partial,
                    target: str = "") -> dict:
  """The dry runs of the memory-saving presets as configured (their own
  batch and mesh), each beside AdamW in its shapes (`ADAMW_OF_PRESET`).

  A preset whose mesh names N > 1 devices compiles for N of `target`
  (`h100` -> `h100x8`); it needs a GPU target and is skipped otherwise.

  Returns:
    {preset: {'step': compiled sizes, 'refresh': compiled sizes or None,
    'adamw': AdamW's compiled sizes, 'devices', 'state_bytes',
    'param_bytes', 'params', 'batch', 'seq', 'method', 'rank'}}; sizes
    per device.
  """
  out = {}
  for name in names:
    cfg = importlib.import_module(f"configs.{name}").get_config()
    devices = preset_devices(cfg)
    preset_target = target
    if devices > 1:
      if not targets.parse(target).is_gpu:
        print(f"{name}: skipped, its mesh needs {devices} devices (use --target)",
              flush=True)
        continue
      preset_target = f"{target}x{devices}"

    def run(cfg=cfg, preset_target=preset_target, devices=devices):
      record = dry_run.dry_run(cfg, preset_target)
      adamw = cfg.copy_and_resolve_references()
      for key, value in ADAMW_OF_PRESET.items():
        section, field = key.split(".")
        adamw[section][field] = value
      return {"step": dry_run.program_sizes(record),
              "refresh": dry_run.program_sizes(record, "refresh_"),
              "adamw": dry_run.program_sizes(dry_run.dry_run(adamw, preset_target)),
              "devices": devices,
              "state_bytes": record["state_bytes"],
              "param_bytes": record["param_bytes"], "params": record["params"],
              "batch": cfg.batch_size, "seq": cfg.seq_len,
              "grad_accum": int(cfg.grad_accum), "method": cfg.opt.name,
              "rank": cfg.opt.rank, "compile_s": record["compile_s"]}
    out[name] = partial.get_or_run(f"preset|{name}", run)
    print(f"{name}: peak {out[name]['step']['peak'] / 2**30:.2f} GiB per device",
          flush=True)
  return out


def presets_table(presets: dict) -> str:
  """Markdown: each preset's dry-run memory (GiB; temporaries and peaks per
  device, weights and state over all devices), and AdamW's peak in the same
  shapes, batch and mesh."""
  gib = lambda b: f"{b / 2**30:.2f}"
  rows = []
  for name, p in presets.items():
    step, refresh, adamw = p["step"], p["refresh"], p.get("adamw")
    rows.append([f"`configs/{name}.py`", _common.method_and_rank(p),
                 f"{p['params'] / 1e9:.1f}B", str(p.get("devices", 1)),
                 _common.tokens_per_step(p), gib(p["param_bytes"]),
                 gib(p["state_bytes"]), gib(step["temp"]), gib(step["peak"]),
                 gib(refresh["peak"]) if refresh else "-",
                 gib(adamw["peak"]) if adamw else "-"])
  return _common.markdown_table(
      ["preset", "method", "params", "devices", "tokens per step", "weights",
       "optimizer state", "step temp", "step peak", "refresh peak",
       "AdamW peak"], rows)


def merge(earlier: dict, results: list[dict], fits: dict | None, args) -> tuple:
  """This run's results over an earlier memory.json's: entries of a size and
  layout measured now replace the earlier ones, the others are kept (with
  their measurement date), in size order."""
  if (earlier["args"]["batch"], earlier["args"]["seq"]) != (args.batch, args.seq):
    raise ValueError(
        f"--merge: {NAME}.json was measured at batch {earlier['args']['batch']} x "
        f"seq {earlier['args']['seq']}, this run at {args.batch} x {args.seq}; "
        "use the same --batch and --seq, or drop --merge")
  new = {(r["size"], r["scan"]) for r in results}
  kept = [dict(r, measured=r.get("measured", earlier["machine"]["date"]))
          for r in earlier["results"] if (r["size"], r["scan"]) not in new]
  order = lambda r: (SIZES.index(r["size"]) if r["size"] in SIZES else -1, r["scan"])
  return sorted(kept + results, key=order), merge_fits(earlier.get("fits"), fits)


def merge_fits(earlier: dict | None, fits: dict | None) -> dict | None:
  """This run's what-fits rows over an earlier run's (same sizes): the rows of
  the methods and variants measured now replace the earlier ones, the others
  are kept. The budgets are the union of both runs'; a row holds an answer
  only for the budgets of the run that measured it."""
  if not (fits and earlier and "peaks" in earlier and "peaks" in fits
          and earlier.get("sizes") == fits.get("sizes")):
    return fits or earlier
  budgets = sorted(set(earlier["budgets_gib"]) | set(fits["budgets_gib"]))
  return dict(fits, budgets_gib=budgets,
              **{key: {**earlier.get(key, {}), **fits[key]}
                 for key in ("peaks", "largest", "variants")})


def _compiler(target: targets.Target) -> dict:
  """What compiled the figures: target, compiler, device kind and platform."""
  device = targets.devices(target)[0]
  return {"target": target.name or device.platform,
          "compiler": targets.compiler_name(target, device),
          "device_kind": device.device_kind, "platform": device.platform,
          "device_count": 1}


DEFAULT_SIZES = ("60m,130m,350m@adamw+optax_galore+subtrack,350m:scan,"
                 "1b@adamw+optax_galore+subtrack,1b:scan,7b:scan")


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
  parser.add_argument("--fits", default="24,40,80",
                      help="comma-separated device memory budgets in GiB for the "
                           "'what fits' table; '' skips it")
  parser.add_argument("--fit_methods", default="",
                      help="comma-separated methods of the 'what fits' table "
                           "(default: every method of --methods)")
  parser.add_argument("--fit_variants", default=",".join(VARIANTS),
                      help=f"comma-separated variants of the fits table: "
                           f"{', '.join(VARIANTS)}")
  parser.add_argument("--presets", default=",".join(PRESETS),
                      help="comma-separated presets to dry-run as they are, "
                           "each beside AdamW in its shapes ('' skips them)")
  parser.add_argument("--target", default="",
                      help="compile for this target (train/targets.py): '' the "
                           "machine's devices, or deviceless for a GPU, e.g. "
                           "h100; results go to <out>/memory_<target>.json")
  parser.add_argument("--merge", action="store_true",
                      help=f"keep the sizes and layouts of <out>/{NAME}.json that "
                           "this run does not measure, and the rows of its fits "
                           "table that this run does not compile")
  args = parser.parse_args()
  target = targets.parse(args.target)
  targets.prepare(target)
  name = f"{NAME}_{target.name}" if target.is_gpu else NAME
  methods = args.methods.split(",")
  info = _common.machine()
  partial = _common.Partial(args.out, name, resume=args.resume)
  results = [measure(spec, methods, args, partial)
             for spec in args.sizes.split(",") if spec]
  fits = None
  if args.fits:
    fits = what_fits([float(b) if "." in b else int(b) for b in args.fits.split(",")],
                     [m for m in FIT_METHODS if m in (
                         args.fit_methods.split(",") if args.fit_methods
                         else methods)], args, partial,
                     tuple(v for v in args.fit_variants.split(",") if v))
  presets = dry_run_presets([p for p in args.presets.split(",") if p], partial,
                            args.target)
  merged_from = _common.load_json(os.path.join(args.out, f"{name}.json")) \
      if args.merge else None
  if merged_from:
    results, fits = merge(merged_from, results, fits, args)
  record = _common.call_record(args, batch=args.batch, seq_len=args.seq)
  payload = _common.with_call(
      {"benchmark": name, "machine": info, **_compiler(target),
       "args": dict(vars(args), out=os.path.relpath(
           args.out, os.path.dirname(os.path.dirname(_common.RESULTS)))),
       "results": results}, merged_from, record)
  if fits:
    payload["fits"] = fits
  earlier_presets = (merged_from or {}).get("presets") or {}
  if presets or earlier_presets:
    payload["presets"] = {name: presets.get(name) or earlier_presets[name]
                          for name in (*PRESETS, *earlier_presets, *presets)
                          if name in presets or name in earlier_presets}
  if args.compare:
    earlier = _common.load_json(args.compare)
    cases = partial.cases
    payload["reused_check"] = {
        key: {"this_run": {k: cases[key]["compiled"][k] for k in ("peak", "temp")}
              | {"state_bytes": cases[key]["state_bytes"]},
              "earlier": {k: earlier[key]["compiled"][k] for k in ("peak", "temp")}
              | {"state_bytes": earlier[key]["state_bytes"]}}
        for key in cases if key in earlier and key not in partial.reused}
    for key, v in payload["reused_check"].items():
      print(f"{key}: this run {v['this_run']}, earlier {v['earlier']}", flush=True)
  markdown = table(results, args) + "\n" + _common.machine_line(info)
  if payload.get("presets"):
    with open(os.path.join(args.out, f"{name}_presets.md"), "w") as f:
      f.write(presets_table(payload["presets"]) + "\n")
  _common.write_results(name, payload, markdown, args.out)
  partial.remove()


if __name__ == "__main__":
  main()

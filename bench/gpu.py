"""GPU throughput and memory: tokens/s, MFU and peak device memory per method.

What it measures, on one accelerator (the first local device):

1. **Throughput** (`--presets`, default the 350M and 1B presets): per case
   (AdamW, SubTrack++, GrassJump, GRASS, and GRASS in its sparse-gradient
   mode), `--steps` train steps of the trainer's own program
   (`train.train.build_programs`: scanned, rematerialised layers, bf16
   compute on float32 master weights, the preset's batch, rank and T, state
   donated) on random tokens, each case in its own subprocess so that its
   peak memory is its own. Reported: tokens/s over the steps after the first
   `--warmup` (refreshes included, so amortised over T), MFU = model FLOPs/s
   / the device's peak bf16 FLOPs (model FLOPs per token: 6 x the matmul
   weights, head included, plus 6 x n_layers x seq x d_model for attention's
   score and value products, halved for the causal mask), and the peak
   device memory `jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]`.
2. **Largest preset that fits** (`--fit-presets`, default 60M to 7B): per
   method, the train step compiled from abstract inputs (nothing allocated),
   and whether the compiler's peak (argument + temp + output - alias) fits in
   the device memory (`bytes_limit` of `memory_stats()`, or `--memory-gb`,
   e.g. 80 for an H100 80 GB).

3. **The one-device presets** (`--one-device`, default
   `configs/llama_7b_24gb.py` and `configs/llama_13b_40gb.py`): each as
   configured (layer-wise updates, bf16 weights, 8-bit or bf16 moments),
   `--steps` train steps as in 1., against the budget in its name (24 or 40
   GB: `peak_bytes_in_use` must stay below it), and beside it the peak the
   deviceless dry run predicts for `--predict` (default h100: `python -m
   train --dry_run --target=h100`, XLA's GPU compiler without the device;
   needs the gpu-compile extra, whose CUDA plugin a GPU install already has).

Without a GPU it says so and exits 0 (nothing is written); `--allow-cpu`
runs it anyway on the CPU (the tests do that with the test preset). Writes
bench/results/gpu.{json,md}.

  python -m bench.gpu                           # 350m and 1b, 300 steps per case
  python -m bench.gpu --presets 350m --steps 100 --fit-presets 1b,7b
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from bench import _common
from train import dry_run
from train import model as model_lib
from train import train as train_lib

NAME = "gpu"
PRESETS = _common.PRESETS
# label -> (opt.name, opt.subspace_layers)
CASES = {"adamw": ("adamw", False), "subtrack": ("subtrack", False),
         "grassjump": ("grassjump", False), "grass": ("grass", False),
         "grass+sparse": ("grass", True),
         "as_configured": (None, None)}  # the preset's own optimizer and mode
# One-device presets and the device memory (GiB) each is made to fit.
ONE_DEVICE = {"7b_24gb": 24, "13b_40gb": 40}
# Dense bf16 tensor-core peak, TFLOP/s, by a substring of `device_kind`.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0,
               "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def config(preset: str, case: str):
  """The preset's config with the case's optimizer (and mode), scanned."""
  if CASES[case][0] is None:
    return importlib.import_module(_common.PRESETS[preset]).get_config()
  cfg = _common.preset_config(preset, *CASES[case])
  cfg.model.scan = True
  return cfg


def flops_per_token(model_cfg: model_lib.LlamaConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (forward + backward, no recompute).

  6 per matmul weight (the attention and MLP kernels and the LM head; the
  embedding is a lookup) plus attention's QK^T and AV products, 6 x 2 x
  n_layers x seq x (n_heads x head_dim), halved for the causal mask.
  """
  per_layer = sum(m * n for m, n in model_cfg.projected_dims().values())
  weights = model_cfg.n_layers * per_layer + model_cfg.d_model * model_cfg.vocab_size
  attention = 6 * model_cfg.n_layers * seq_len * model_cfg.n_heads * model_cfg.head_dim
  return 6.0 * weights + attention


def peak_tflops(device: jax.Device, override: float) -> float | None:
  """The device's peak bf16 TFLOP/s (`override` if > 0; None if unknown)."""
  if override > 0:
    return override
  kind = getattr(device, "device_kind", "")
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops
  return None


def _programs(cfg):
  return train_lib.build_programs(cfg, cfg.data.vocab_size, train_lib.validate(cfg))


def _batch(cfg, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (cfg.batch_size, cfg.seq_len + 1),
                            0, cfg.data.vocab_size, jnp.int32)


def measure_case(preset: str, case: str, steps: int, warmup: int) -> dict:
  """Runs `steps` train steps of one case and times the last `steps - warmup`.

  Returns:
    tokens/s, seconds per step, the compiled step's memory analysis and the
    device's peak bytes in use (None where the device keeps no statistics).
  """
  if not 0 < warmup < steps:
    raise ValueError(f"--warmup must be in [1, --steps={steps}), got {warmup}")
  cfg = config(preset, case)
  programs = _programs(cfg)
  batch = _batch(cfg)
  state = jax.jit(programs.init)()
  compiled = _compiled_steps(programs, state, batch)
  refresh = None
  if programs.refresh is not None:
    refresh = jax.jit(programs.refresh, donate_argnums=0)
  interval = cfg.opt.update_interval
  start = None
  for i in range(steps):
    if i == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    if refresh is not None and i % interval == 0:
      state = refresh(state, batch)
    # A subspax method's refresh steps are a program of their own.
    step = compiled[-1] if i % interval == 0 else compiled[0]
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / (steps - warmup)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      "preset": preset, "case": case, "steps": steps, "warmup": warmup,
      "step_s": seconds,
      "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
      "final_loss": float(metrics["train/loss"]),
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "compiled_peak": max(_common.compiled_memory(c)["peak"] for c in compiled),
      "params": model_lib.count_params(programs.model_cfg),
      "flops_per_token": flops_per_token(programs.model_cfg, cfg.seq_len),
      "batch": cfg.batch_size, "seq_len": cfg.seq_len, "rank": cfg.opt.rank,
      "update_interval": interval,
  }


def _compiled_steps(programs, state, batch) -> list:
  """The compiled train step, and the refresh step where there is one."""
  steps = [programs.ordinary_step or programs.train_step, programs.refresh_step]
  return [jax.jit(s, donate_argnums=0).lower(state, batch).compile()
          for s in steps if s is not None]


def compiled_peak(preset: str, case: str) -> int:
  """The compiler's peak bytes of a run's donated train steps (the larger of
  the ordinary and the refresh step; nothing allocated)."""
  cfg = config(preset, case)
  programs = _programs(cfg)
  state = jax.eval_shape(programs.init)
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
  return max(_common.compiled_memory(c)["peak"]
             for c in _compiled_steps(programs, state, batch))


def predicted_peak(preset: str, target: str) -> dict:
  """The deviceless dry run's peak for `target` (`python -m train --dry_run
  --target=...` in a subprocess: XLA's GPU compiler without the device), to
  set beside what the device measures."""
  with tempfile.TemporaryDirectory() as workdir:
    done = subprocess.run(
        [sys.executable, "-m", "train", "--config",
         _common.PRESETS[preset].rsplit(".", 1)[-1],  # a packaged preset's name
         "--dry_run", f"--target={target}", "--workdir", workdir],
        capture_output=True, text=True, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    path = os.path.join(workdir, "memory.json")
    if done.returncode or not os.path.exists(path):
      return {"target": target, "error": (done.stderr or done.stdout)[-300:]}
    with open(path) as f:
      record = json.load(f)
  return {"target": target, "peak": dry_run.run_sizes(record)["peak"]}


def _worker(kind: str, preset: str, case: str, args) -> dict:
  """One measurement in a fresh process (its own peak memory, and an
  out-of-memory failure is that case's result, not the run's end)."""
  command = [sys.executable, "-m", "bench.gpu", "--worker", kind, preset, case,
             "--steps", str(args.steps), "--warmup", str(args.warmup)]
  if args.allow_cpu:
    command.append("--allow-cpu")
  done = subprocess.run(command, capture_output=True, text=True,
                        timeout=args.case_timeout)
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"preset": preset, "case": case, "error": " ".join(tail)[-300:]}
  return json.loads(lines[-1])


def table(payload: dict) -> str:
  mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
  lines = []
  runs = payload["throughput"]
  for preset in dict.fromkeys(r["preset"] for r in runs):
    mine = [r for r in runs if r["preset"] == preset]
    ok = [r for r in mine if "error" not in r]
    ref = next((r for r in ok if r["case"] == "adamw"), None)
    if ok:
      r0 = ok[0]
      lines.append(
          f"**{preset}** ({r0['params'] / 1e6:.1f}M params, batch {r0['batch']} x "
          f"seq {r0['seq_len']}, rank {r0['rank']}, T = {r0['update_interval']}, "
          f"{r0['steps'] - r0['warmup']} timed steps after {r0['warmup']}):\n")
    rows = []
    for r in mine:
      if "error" in r:
        rows.append([r["case"], "failed: " + r["error"]] + ["-"] * 6)
        continue
      flops = r["flops_per_token"] * r["tokens_per_s"]
      peak = payload["peak_tflops"]
      rows.append([
          r["case"], f"{r['tokens_per_s']:,.0f}",
          f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}" if ref else "-",
          f"{flops / (peak * 1e12):.3f}" if peak else "-",
          mib(r["peak_bytes_in_use"]),
          (f"{r['peak_bytes_in_use'] / ref['peak_bytes_in_use']:.3f}"
           if ref and r["peak_bytes_in_use"] and ref["peak_bytes_in_use"] else "-"),
          mib(r["compiled_peak"]), f"{r['final_loss']:.3f}"])
    lines.append(_common.markdown_table(
        ["case", "tokens/s", "x AdamW", "MFU", "peak MiB (memory_stats)",
         "x AdamW", "compiled peak MiB", "final loss"], rows))
    lines.append("")
  fit = payload["fits"]
  if fit:
    limit = payload["memory_limit"]
    lines.append(f"Largest preset whose compiled train step fits in "
                 f"{limit / 2**30:.1f} GiB (compiler's peak, MiB):\n")
    presets = list(dict.fromkeys(f["preset"] for f in fit))
    rows = []
    for case in dict.fromkeys(f["case"] for f in fit):
      cells, largest = [], "none"
      for preset in presets:
        f = next(f for f in fit if f["case"] == case and f["preset"] == preset)
        if "error" in f:
          cells.append("failed")
          continue
        cells.append(f"{mib(f['peak'])}{'' if f['peak'] <= limit else ' (no)'}")
        if f["peak"] <= limit:
          largest = preset
      rows.append([case, *cells, largest])
    lines.append(_common.markdown_table(["case", *presets, "largest that fits"], rows))
    lines.append("")
  one = payload.get("one_device") or []
  if one:
    lines.append("One-device presets, trained as configured:\n")
    rows = []
    for r in one:
      if "error" in r:
        rows.append([r["preset"], "failed: " + r["error"]] + ["-"] * 6)
        continue
      used = r["peak_bytes_in_use"]
      predicted = (r.get("predicted") or {}).get("peak")
      rows.append([r["preset"], f"{r['tokens_per_s']:,.0f}", mib(used),
                   mib(r["compiled_peak"]), mib(predicted),
                   f"{used / predicted:.3f}" if used and predicted else "-",
                   f"{r['budget_gib']} GiB" + (
                       "" if used is None or used <= r["budget_gib"] * 2**30
                       else " (exceeded)"), f"{r['final_loss']:.3f}"])
    lines.append(_common.markdown_table(
        ["preset", "tokens/s", "peak MiB (memory_stats)", "compiled peak MiB",
         "deviceless prediction MiB", "measured / predicted", "budget",
         "final loss"], rows))
    lines.append("")
  lines.append(f"Device: {payload['device']}; peak bf16 "
               f"{payload['peak_tflops'] or '?'} TFLOP/s (MFU uses it).")
  lines.append(_common.machine_line(payload["machine"]))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="350m,1b")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--fit-presets", default="60m,130m,350m,1b,7b",
                      help="presets for the fits-in-memory table ('' to skip)")
  parser.add_argument("--fit-cases", default="adamw,subtrack,grassjump,grass,grass+sparse")
  parser.add_argument("--one-device", default=",".join(ONE_DEVICE),
                      help="one-device presets to train as configured ('' to skip)")
  parser.add_argument("--memory-gb", type=float, default=0.0,
                      help="device memory for the fit table (0: memory_stats' bytes_limit)")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="peak bf16 TFLOP/s for MFU (0: from the device kind)")
  parser.add_argument("--predict", default="h100",
                      help="for the one-device presets, also the deviceless "
                           "dry run's peak for this target (train/targets.py; "
                           "'' skips it), beside the measured peak")
  parser.add_argument("--case-timeout", type=float, default=3600.0)
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run on the CPU when there is no GPU (for testing)")
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--worker", nargs=3, metavar=("KIND", "PRESET", "CASE"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for field, names in (("presets", args.presets), ("fit-presets", args.fit_presets)):
    unknown = [p for p in names.split(",") if p and p not in PRESETS]
    if unknown:
      parser.error(f"--{field}: unknown {unknown}; choose from {', '.join(PRESETS)}")
  unknown = [p for p in args.one_device.split(",") if p and p not in ONE_DEVICE]
  if unknown:
    parser.error(f"--one-device: unknown {unknown}; choose from {', '.join(ONE_DEVICE)}")
  for field, names in (("cases", args.cases), ("fit-cases", args.fit_cases)):
    unknown = [c for c in names.split(",") if c and c not in CASES]
    if unknown:
      parser.error(f"--{field}: unknown {unknown}; choose from {', '.join(CASES)}")
  device = jax.local_devices()[0]
  if device.platform != "gpu" and not args.allow_cpu:
    print(f"bench.gpu: no GPU here (first device: {device.platform}); skipped. "
          "Run it on a GPU host, or pass --allow-cpu to try it on the CPU.")
    return 0
  if args.worker:
    kind, preset, case = args.worker
    if kind == "run":
      result = measure_case(preset, case, args.steps, args.warmup)
    else:
      result = {"preset": preset, "case": case, "peak": compiled_peak(preset, case)}
    print(json.dumps(result), flush=True)
    return 0
  stats = device.memory_stats() or {}
  limit = int(args.memory_gb * 2**30) or stats.get("bytes_limit")
  record = _common.call_record(args, argv)
  payload = {"benchmark": NAME, "machine": record["machine"],
             "args": record["args"], "calls": [record],
             "device": getattr(device, "device_kind", device.platform),
             "peak_tflops": peak_tflops(device, args.peak_tflops),
             "memory_limit": limit, "throughput": [], "fits": []}
  for preset in filter(None, args.presets.split(",")):
    for case in args.cases.split(","):
      payload["throughput"].append(_worker("run", preset, case, args))
      print(json.dumps(payload["throughput"][-1]), flush=True)
  payload["one_device"] = []
  for preset in filter(None, args.one_device.split(",")):
    result = _worker("run", preset, "as_configured", args)
    result["budget_gib"] = ONE_DEVICE.get(preset)
    if args.predict:
      result["predicted"] = predicted_peak(preset, args.predict)
    payload["one_device"].append(result)
    print(json.dumps(result), flush=True)
  if limit:
    for preset in filter(None, args.fit_presets.split(",")):
      for case in args.fit_cases.split(","):
        payload["fits"].append(_worker("fit", preset, case, args))
        print(json.dumps(payload["fits"][-1]), flush=True)
  _common.write_results(NAME, payload, table(payload), args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())

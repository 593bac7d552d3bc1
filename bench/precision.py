"""Precision: bfloat16 and int8 weights with stochastic rounding vs float32 weights.

What it measures: the tiny preset (configs/tiny.py: LLaMA d_model 256, 4
scanned layers, vocab 8192, float32 compute) trained with one method (SubTrack++,
the preset's, by default) and seed, the same data and batches, three times:

* `float32`: float32 master weights (the preset);
* `bf16_sr`: `model.param_dtype=bfloat16`, each update added in float32 and
  rounded to bfloat16 stochastically (`opt.stochastic_rounding`, on by default
  for bfloat16 weights; subspax.apply_updates);
* `bf16_rn`: bfloat16 weights, updates rounded to nearest
  (`opt.stochastic_rounding=False`);
* `int8_sr`: the blocks' kernels in int8 (`model.kernel_format=int8`, one
  float32 scale per 256 values of a row), each update added in float32 and
  re-quantized with stochastic rounding; the rest bfloat16 as in `bf16_sr`.
  int8 kernels need layer-wise updates (`opt.layerwise`, which computes the
  same step as the ordinary one);
* `int8_rn`: int8 kernels and bfloat16 rest, rounded to nearest;
* `int8_sr_int8_bases`: `int8_sr` with the method's bases in 8-bit blocks too
  (`opt.basis_dtype=int8`; the other variants keep float32 bases).

The Adam moments stay float32 in all of them (`opt.mu_dtype`, `opt.nu_dtype`).
Every run is `train.train.run` itself (bench.convergence's `run_config`:
checkpoints off); the table reports the final eval loss and its ratio to the
float32 run's (or, without it, to bf16_sr's). Targets: bf16_sr within 1% of
float32, int8_sr within 2% of bf16_sr.

Writes bench/results/precision.{json,md}; the JSON is updated after every run,
and `--resume` skips runs already in it.

  python -m bench.precision                       # 400 steps, seq 128 (~40 min here)
  python -m bench.precision --steps 20 --variants float32,bf16_sr
  python -m bench.precision --name precision_low_lr --lr 3e-4   # smaller updates
  python -m bench.precision --name int8_quality --variants bf16_sr,int8_sr,int8_rn,int8_sr_int8_bases
"""

import argparse
import json
import os
import tempfile

from bench import _common
from bench import convergence
from configs import tiny

NAME = "precision"
# variant -> (model.param_dtype, opt.stochastic_rounding, model.kernel_format,
#             opt.basis_dtype)
VARIANTS = {"float32": ("float32", None, "float", "float32"),
            "bf16_sr": ("bfloat16", True, "float", "float32"),
            "bf16_rn": ("bfloat16", False, "float", "float32"),
            "int8_sr": ("bfloat16", True, "int8", "float32"),
            "int8_rn": ("bfloat16", False, "int8", "float32"),
            "int8_sr_int8_bases": ("bfloat16", True, "int8", "int8")}
ROUNDING = {"float32": "none (float32 sum)", "bf16_sr": "stochastic",
            "bf16_rn": "to nearest", "int8_sr": "stochastic",
            "int8_rn": "to nearest", "int8_sr_int8_bases": "stochastic"}


def make_config(variant: str, args: argparse.Namespace):
  cfg = convergence.make_config(args.method, args.lr, args)
  cfg.model.scan = True  # the preset's layout: stacked leaves, per-layer keys
  (cfg.model.param_dtype, cfg.opt.stochastic_rounding,
   cfg.model.kernel_format, cfg.opt.basis_dtype) = VARIANTS[variant]
  cfg.opt.layerwise = cfg.model.kernel_format == "int8"  # what int8 needs
  return cfg


def report(payload: dict) -> str:
  runs = {r["variant"]: r for r in payload["runs"]}
  ref_name = "float32" if "float32" in runs else "bf16_sr"
  ref = runs.get(ref_name)
  weights = lambda name: (f"int8 kernels, {VARIANTS[name][0]} rest"
                          if VARIANTS[name][2] == "int8" else VARIANTS[name][0])
  rows = [[name, weights(name), ROUNDING[name], VARIANTS[name][3],
           f"{r['final_eval_loss']:.4f}",
           f"{r['final_eval_loss'] / ref['final_eval_loss']:.4f}" if ref else "-",
           f"{r['wall_s']:.0f}"]
          for name in VARIANTS if (r := runs.get(name))]
  args = payload["args"]
  anyrun = payload["runs"][0]
  text = [
      f"Tiny preset (7.4M params, vocab 8192, scanned layers, float32 compute), "
      f"{args['method']} at lr {args['lr']:g}, batch {anyrun['batch_size']} x seq "
      f"{anyrun['seq_len']}, {anyrun['steps']} steps = {anyrun['tokens']:,} tokens, "
      f"seed {args['seed']}, warmup 10% then cosine to 0.1x, eval on "
      f"{payload['eval_batches']} held-out batches; float32 Adam moments in every "
      f"run. Wall = train.run end to end on a shared 2-core CPU.",
      "",
      _common.markdown_table(
          ["variant", "weights", "update rounding", "bases", "final eval loss",
           f"vs {ref_name}", "wall s"], rows),
      "",
      _common.machine_line(payload["machine"]),
  ]
  return "\n".join(text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--method", default=tiny.get_config().opt.name)
  parser.add_argument("--lr", type=float, default=tiny.get_config().opt.learning_rate)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--rank", type=int, default=0, help="0: the preset's rank")
  parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
  parser.add_argument("--seq-len", type=int, default=128, help="0: the preset's")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--name", default=NAME,
                      help="results file stem (bench/results/NAME.{json,md})")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "subspax-bench-precision"))
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in the JSON and skip them")
  args = parser.parse_args(argv)
  json_path = os.path.join(args.out, f"{args.name}.json")
  earlier = _common.load_json(json_path) if args.resume else None
  runs = earlier["runs"] if earlier else []
  preset = tiny.get_config()
  record = _common.call_record(
      args, argv, batch=args.batch_size or preset.batch_size,
      seq_len=args.seq_len or preset.seq_len)
  payload = _common.with_call(
      {"benchmark": args.name, "machine": record["machine"], "args": record["args"],
       "eval_batches": preset.eval_batches, "runs": runs}, earlier, record)
  call = len(payload["calls"]) - 1
  os.makedirs(args.out, exist_ok=True)
  for variant in args.variants.split(","):
    if any(r["variant"] == variant and r["steps"] == args.steps for r in runs):
      continue
    print(f"=== {variant}", flush=True)
    result = convergence.run_config(make_config(variant, args),
                                    os.path.join(args.workdir, variant))
    runs.append({"variant": variant, **result, "call": call})
    print(f"=== {variant}: eval loss {result['final_eval_loss']:.4f}, wall "
          f"{result['wall_s']:.0f} s", flush=True)
    with open(json_path, "w") as f:
      json.dump(payload, f, indent=1)
  _common.write_results(args.name, payload, report(payload), args.out)


if __name__ == "__main__":
  main()

"""Convergence: eval loss vs tokens of every method on the same data and budget.

What it measures: each method (AdamW, the six subspax methods with their paper
defaults from the trainer's registry, and optax.contrib.galore with the same
rank and gap) trains the tiny preset (configs/tiny.py: LLaMA d_model 256,
4 layers, vocab 8192, batch 8 x seq 256, rank 64, refresh every 50 steps) on
the default Shakespeare + Milton corpus, with the same seed (same init, same
batch order) and the same token budget. Every run is `train.train.run(cfg,
workdir)` itself (warmup 10% of the steps, cosine to 0.1x); the script reads
the `metrics.jsonl` it writes. Each method runs at a short learning-rate sweep
(--lrs; the preset's 3e-3 is the default) and the table reports, per method,
the final eval loss at the preset learning rate and the best over the sweep,
plus exact optimizer-state bytes and wall time (train.run end to end, compile
and evals included; the machine is shared, so wall time is indicative only).
Checkpointing is switched off (Checkpointer.save patched to a no-op): it is
not what is measured.
`model.scan` is False for every run because optax.contrib.galore cannot
project scanned (L, in, out) kernels; the math is the same either way.

Writes bench/results/convergence.{json,md,png}; the JSON is updated after every
run, and `--resume` skips runs already in it. The JSON's `calls` lists every
invocation that contributed runs (command line, arguments, batch, sequence
length, machine, date, versions); each run's `call` indexes it.

  python -m bench.convergence                       # the full sweep (~1.5 h here)
  python -m bench.convergence --steps 20 --methods adamw,subtrack --lrs 3e-3
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from bench import _common
from configs import tiny
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import train as train_lib

NAME = "convergence"


def make_config(method: str, lr: float, args: argparse.Namespace):
  cfg = tiny.get_config()
  cfg.steps = args.steps
  cfg.batch_size = args.batch_size or cfg.batch_size
  cfg.seq_len = args.seq_len or cfg.seq_len
  cfg.eval_every = args.eval_every
  cfg.checkpoint_every = args.steps  # one checkpoint, at the end
  cfg.log_every = 1
  cfg.seed = args.seed
  cfg.model.scan = False
  cfg.opt.name = method
  cfg.opt.learning_rate = lr
  cfg.opt.warmup_steps = max(1, args.steps // 10)
  if args.rank:
    cfg.opt.rank = args.rank
  return cfg


def run_one(method: str, lr: float, args: argparse.Namespace) -> dict:
  cfg = make_config(method, lr, args)
  return {"method": method, "lr": lr,
          **run_config(cfg, os.path.join(args.workdir, f"{method}-lr{lr:g}"))}


def run_config(cfg, workdir: str) -> dict:
  """Trains `cfg` in a fresh `workdir` (no checkpoints) and returns its curves,
  final eval loss, state bytes and times; the workdir is removed after."""
  shutil.rmtree(workdir, ignore_errors=True)  # never resume a stale run
  start = time.perf_counter()
  # No checkpoints: they are not what is measured.
  with mock.patch.object(checkpoint_lib.Checkpointer, "save",
                         lambda *a, **k: None):
    train_lib.run(cfg, workdir)
  wall = time.perf_counter() - start
  records = metrics_lib.read(workdir)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  evals = [(r["step"] * tokens_per_step, r["eval/loss"]) for r in records
           if "eval/loss" in r]
  shutil.rmtree(workdir, ignore_errors=True)
  return {
      "steps": cfg.steps,
      "tokens": cfg.steps * tokens_per_step,
      "eval": evals,
      "train_loss": [(r["step"] * tokens_per_step, r["train/loss"]) for r in records],
      "final_eval_loss": evals[-1][1],
      "state_bytes": records[-1]["opt/state_bytes"],
      "wall_s": wall,
      "step_time_s_sum": sum(r["perf/step_time"] for r in records[1:]),
      "rank": cfg.opt.rank, "update_interval": cfg.opt.update_interval,
      "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
  }


def report(payload: dict, default_lr: float) -> str:
  runs = payload["runs"]
  methods = [m for m in payload["methods"] if any(r["method"] == m for r in runs)]
  by = {(r["method"], r["lr"]): r for r in runs}
  best = {}
  for m in methods:
    mine = [r for r in runs if r["method"] == m]
    best[m] = min(mine, key=lambda r: r["final_eval_loss"])
  ref = best.get("adamw")
  ref_default = by.get(("adamw", default_lr))
  rows = []
  for m in methods:
    b, d = best[m], by.get((m, default_lr))
    swept = sorted(r["lr"] for r in runs if r["method"] == m)
    rows.append([
        m,
        d["final_eval_loss"] if d else "-",
        (d["final_eval_loss"] / ref_default["final_eval_loss"]
         if d and ref_default else "-"),
        f"{b['lr']:g} (of {', '.join(f'{x:g}' for x in swept)})",
        b["final_eval_loss"],
        b["final_eval_loss"] / ref["final_eval_loss"] if ref else "-",
        f"{b['state_bytes'] / 2**20:.2f}",
        b["state_bytes"] / ref["state_bytes"] if ref else "-",
        f"{b['wall_s']:.0f}",
    ])
  any_run = runs[0]
  text = [
      f"Tiny preset (7.4M params, vocab 8192), batch "
      f"{any_run.get('batch_size', 8)} x seq {any_run.get('seq_len', 256)}, "
      f"{any_run['steps']} steps = {any_run['tokens']:,} tokens, seed "
      f"{payload['args']['seed']}, rank {any_run['rank']}, refresh every "
      f"{any_run['update_interval']} steps, warmup 10% then cosine to 0.1x, "
      f"eval on {payload['eval_batches']} held-out batches. Reported: final eval "
      f"loss at the preset lr {default_lr:g} and the best over the lr sweep "
      f"(per method); ratios are to AdamW's at the same lr / AdamW's best. "
      f"State = exact optimizer-state bytes (all params); wall = train.run end "
      f"to end (compile and evals included) on a shared 2-core CPU.",
      "",
      _common.markdown_table(
          ["method", f"eval loss @ lr {default_lr:g}", "vs AdamW", "best lr",
           "best eval loss", "vs AdamW best", "state MiB", "state vs AdamW",
           "wall s"], rows),
      "",
      _common.machine_line(payload["machine"]),
  ]
  return "\n".join(text)


def plot(payload: dict, path: str) -> None:
  """Eval loss vs tokens: the best lr of the sweep per method and the preset
  lr; with a single lr, the eval loss and the train loss at that lr."""
  runs = payload["runs"]
  methods = [m for m in payload["methods"] if any(r["method"] == m for r in runs)]
  default_lr = payload["args"]["default_lr"]
  swept = len({r["lr"] for r in runs}) > 1
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=swept)
  for m in methods:
    mine = [r for r in runs if r["method"] == m]
    best = min(mine, key=lambda r: r["final_eval_loss"])
    style = "k-" if m == "adamw" else "-"
    x, y = zip(*best["eval"])
    axes[0].plot(x, y, style, marker="o", ms=3, label=f"{m} (lr {best['lr']:g})")
    if swept:
      at_default = [r for r in mine if r["lr"] == default_lr]
      if at_default:
        x, y = zip(*at_default[0]["eval"])
        axes[1].plot(x, y, style, marker="o", ms=3, label=m)
    else:
      x, y = zip(*best["train_loss"])
      window = max(1, len(y) // 50)  # a running mean over 2% of the steps
      smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1])
                for i in range(len(y))]
      axes[1].plot(x, smooth, style, lw=1, label=m)
  if swept:
    axes[0].set_title("best learning rate of the sweep, per method")
    axes[1].set_title(f"preset learning rate {default_lr:g}")
    axes[0].set_ylabel("eval loss (nats/token)")
  else:
    axes[0].set_title("eval loss (held out)")
    axes[1].set_title("train loss (running mean)")
    axes[0].set_ylabel("loss (nats/token)")
  for ax in axes:
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("tiny LLaMA on Shakespeare+Milton: loss vs tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default=",".join(_common.METHODS))
  parser.add_argument("--lrs", default="3e-3,1e-3,1e-2",
                      help="learning-rate sweep; the first is the preset default")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--eval-every", type=int, default=15)
  parser.add_argument("--rank", type=int, default=0, help="0: the preset's rank")
  parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
  parser.add_argument("--seq-len", type=int, default=0, help="0: the preset's")
  parser.add_argument("--name", default=NAME,
                      help="results file stem (bench/results/NAME.{json,md,png})")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "subspax-bench-convergence"))
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in the JSON and skip them")
  args = parser.parse_args(argv)
  methods = args.methods.split(",")
  lrs = [float(x) for x in args.lrs.split(",")]
  args.default_lr = tiny.get_config().opt.learning_rate
  json_path = os.path.join(args.out, f"{args.name}.json")
  earlier = _common.load_json(json_path) if args.resume else None
  runs = earlier["runs"] if earlier else []
  reported = list(dict.fromkeys([r["method"] for r in runs] + methods))
  preset = tiny.get_config()
  record = _common.call_record(
      args, argv, batch=args.batch_size or preset.batch_size,
      seq_len=args.seq_len or preset.seq_len)
  payload = _common.with_call(
      {"benchmark": args.name, "machine": record["machine"],
       "args": record["args"], "methods": reported,
       "eval_batches": preset.eval_batches, "runs": runs}, earlier, record)
  call = len(payload["calls"]) - 1  # each new run names the call that made it
  os.makedirs(args.out, exist_ok=True)
  # Learning rate outermost: every method gets the default lr before any sweep.
  for lr in lrs:
    for method in methods:
      if any(r["method"] == method and r["lr"] == lr and r["steps"] == args.steps
             for r in runs):
        continue
      print(f"=== {method} lr {lr:g}", flush=True)
      runs.append({**run_one(method, lr, args), "call": call})
      print(f"=== {method} lr {lr:g}: eval loss {runs[-1]['final_eval_loss']:.4f}, "
            f"wall {runs[-1]['wall_s']:.0f} s", flush=True)
      with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
  markdown = report(payload, args.default_lr)
  plot(payload, os.path.join(args.out, f"{args.name}.png"))
  _common.write_results(args.name, payload, markdown, args.out)


if __name__ == "__main__":
  main()

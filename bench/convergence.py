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

A baseline (bench/results/baseline.*): `--sweep METHOD=LR,...` gives a method
its own learning rates (the others run at --lrs); `adamw_split` is a method row
of its own, AdamW with the subspax methods' two learning-rate groups
(`opt.block_lr_scale` = the preset method's `scale`, 0.25 for SubTrack++:
the blocks' kernels at 0.25 x lr, embedding, head and norms at lr);
`--seeds 0,1` runs the sweep at the first seed and every method again at its
best learning rate of that sweep with each further seed; `--reuse NAME` takes
runs of the same method, lr, seed, steps, batch, sequence and eval schedule
from bench/results/NAME.json instead of training them again (each keeps its
wall time, is marked `reused_from`, and its call is copied into `calls`).

Writes bench/results/convergence.{json,md,png}; the JSON is updated after every
run, and `--resume` skips runs already in it. The JSON's `calls` lists every
invocation that contributed runs (command line, arguments, batch, sequence
length, machine, date, versions); each run's `call` indexes it.

  python -m bench.convergence                       # the full sweep (~1.5 h here)
  python -m bench.convergence --steps 20 --methods adamw,subtrack --lrs 3e-3
  python -m bench.convergence --name baseline --steps 400 --seq-len 128 \
      --eval-every 50 --methods adamw,adamw_split,subtrack,grasswalk,apollo \
      --lrs 3e-3 --sweep adamw=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 \
      --sweep adamw_split=1e-3,2e-3,3e-3,5e-3,1e-2,3e-2 --seeds 0,1 \
      --reuse convergence_long --resume       # AdamW tuned (~1.5 h here)
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

# Method rows that are a trainer optimizer with options set: row name ->
# (opt.name, the preset config -> the `opt` fields to set).
VARIANTS = {
    # AdamW with the subspax methods' learning-rate groups: the kernels they
    # project at the preset method's scale x lr (SubTrack++'s 0.25 on tiny).
    "adamw_split": ("adamw", lambda cfg: {
        "block_lr_scale": cfg.opt[cfg.opt.name].scale}),
}


def make_config(method: str, lr: float, args: argparse.Namespace,
                seed: int | None = None):
  """The tiny preset as the benchmark trains it.

  Example:
    cfg = make_config("adamw_split", 3e-3, args, seed=1)  # opt.name adamw

  Args:
    method: A trainer optimizer name or a key of `VARIANTS`.
    lr: The peak learning rate.
    args: The parsed flags (steps, batch, sequence, eval schedule, rank).
    seed: The run's seed (init, batch order, subspaces); None: `args.seed`.

  Returns:
    The trainer config.
  """
  cfg = tiny.get_config()
  opt_name, fields = VARIANTS.get(method, (method, lambda cfg: {}))
  cfg.opt.update(fields(cfg))
  cfg.steps = args.steps
  cfg.batch_size = args.batch_size or cfg.batch_size
  cfg.seq_len = args.seq_len or cfg.seq_len
  cfg.eval_every = args.eval_every
  cfg.checkpoint_every = args.steps  # one checkpoint, at the end
  cfg.log_every = 1
  cfg.seed = args.seed if seed is None else seed
  cfg.model.scan = False
  cfg.opt.name = opt_name
  cfg.opt.learning_rate = lr
  cfg.opt.warmup_steps = max(1, args.steps // 10)
  if args.rank:
    cfg.opt.rank = args.rank
  return cfg


def run_one(method: str, lr: float, args: argparse.Namespace,
            seed: int | None = None) -> dict:
  """Trains `method` at `lr` and `seed` (`make_config`); its run record."""
  cfg = make_config(method, lr, args, seed)
  workdir = os.path.join(args.workdir, f"{method}-lr{lr:g}-seed{cfg.seed}")
  return {"method": method, "lr": lr, "seed": cfg.seed,
          **({"block_lr_scale": cfg.opt.block_lr_scale}
             if cfg.opt.block_lr_scale != 1 else {}),
          **run_config(cfg, workdir)}


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


def run_seed(run: dict, payload: dict) -> int:
  """The seed a run trained with.

  Examples:
    >>> run_seed({"call": 0}, {"calls": [{"args": {"seed": 3}}], "args": {}})
    3

  Args:
    run: One record of `payload["runs"]`.
    payload: The result it belongs to.

  Returns:
    The run's own `seed`, or (runs recorded before it was stored) the
    `--seed` of the call that made it, else of the payload.
  """
  if "seed" in run:
    return run["seed"]
  calls = payload.get("calls") or []
  call = calls[run["call"]] if run.get("call", len(calls)) < len(calls) else {}
  return (call.get("args") or payload["args"]).get("seed", 0)


def sweep_seed(payload: dict) -> int:
  """The seed of the learning-rate sweep.

  Examples:
    >>> sweep_seed({"args": {"seeds": "2,5", "seed": 0}})
    2

  Args:
    payload: A convergence result.

  Returns:
    The first of the last call's `--seeds`, else its `--seed`.
  """
  args = payload["args"]
  return int(str(args.get("seeds") or args.get("seed", 0)).split(",")[0])


def seed_rows(payload: dict) -> list[dict]:
  """Per method, its best learning rate at the sweep seed and every seed run
  there, against the tuned AdamW (the lowest mean of `adamw` and the
  `VARIANTS` rows that are AdamW).

  Examples:
    >>> run = lambda m, lr, seed, loss: {"method": m, "lr": lr, "seed": seed,
    ...     "final_eval_loss": loss, "state_bytes": 8, "wall_s": 60.0}
    >>> payload = {"args": {"seeds": "0,1"}, "methods": ["adamw", "subtrack"],
    ...            "runs": [run("adamw", 1e-3, 0, 5.0), run("adamw", 3e-3, 0, 5.2),
    ...                     run("adamw", 1e-3, 1, 5.2), run("subtrack", 3e-3, 0, 4.9),
    ...                     run("subtrack", 3e-3, 1, 5.1)]}
    >>> [(r["method"], r["lr"], r["losses"], round(r["vs_tuned"], 3))
    ...  for r in seed_rows(payload)]
    [('adamw', 0.001, {0: 5.0, 1: 5.2}, 1.0), ('subtrack', 0.003, {0: 4.9, 1: 5.1}, 0.98)]

  Args:
    payload: A convergence result (`runs`, `methods`, `args`, `calls`).

  Returns:
    One dict per method that ran at the sweep seed: `method`, `lr`, `losses`
    (seed -> final eval loss), `mean`, `runs`, `vs_tuned` (the mean over the
    tuned AdamW's mean, both over the seeds both ran), `per_seed` (seed ->
    ratio to the tuned AdamW at that seed) and `tuned` (its row name).
  """
  runs, first = payload["runs"], sweep_seed(payload)
  rows = []
  for m in payload["methods"]:
    swept = [r for r in runs if r["method"] == m and run_seed(r, payload) == first]
    if not swept:
      continue
    lr = min(swept, key=lambda r: r["final_eval_loss"])["lr"]
    mine = sorted((r for r in runs if r["method"] == m and r["lr"] == lr),
                  key=lambda r: run_seed(r, payload))
    losses = {run_seed(r, payload): r["final_eval_loss"] for r in mine}
    rows.append({"method": m, "lr": lr, "losses": losses, "runs": mine,
                 "mean": sum(losses.values()) / len(losses)})
  adamw = [r for r in rows
           if VARIANTS.get(r["method"], (r["method"],))[0] == "adamw"]
  tuned = min(adamw, key=lambda r: r["mean"]) if adamw else None
  for r in rows:
    shared = [s for s in r["losses"] if tuned and s in tuned["losses"]]
    r["tuned"] = tuned["method"] if tuned else None
    r["vs_tuned"] = (sum(r["losses"][s] for s in shared)
                     / sum(tuned["losses"][s] for s in shared) if shared else None)
    r["per_seed"] = {s: r["losses"][s] / tuned["losses"][s] for s in shared}
  return rows


def is_baseline(payload: dict) -> bool:
  """Whether a result gets the baseline tables.

  Example:
    is_baseline(json.load(open("bench/results/convergence_long.json")))  # False

  Args:
    payload: A convergence result.

  Returns:
    True with several seeds or a `VARIANTS` row (the sweep and seeds
    tables); False for one sweep at one seed (the original table).
  """
  seeds = {run_seed(r, payload) for r in payload["runs"]}
  return len(seeds) > 1 or any(r["method"] in VARIANTS for r in payload["runs"])


def _baseline_tables(payload: dict) -> list[str]:
  """The sweep at the first seed (method x lr) and the seeds table."""
  runs, first = payload["runs"], sweep_seed(payload)
  methods = [m for m in payload["methods"] if any(r["method"] == m for r in runs)]
  lrs = sorted({r["lr"] for r in runs})
  at = {(r["method"], r["lr"]): r["final_eval_loss"] for r in runs
        if run_seed(r, payload) == first}
  sweep = []
  for m in methods:
    mine = [at[(m, lr)] for lr in lrs if (m, lr) in at]
    best = min(mine) if mine else None
    sweep.append([m] + [("-" if (m, lr) not in at else
                         f"**{at[(m, lr)]:.3f}**" if at[(m, lr)] == best
                         else f"{at[(m, lr)]:.3f}") for lr in lrs])
  rows = seed_rows(payload)
  seeds = sorted({s for r in rows for s in r["losses"]})
  table = []
  for r in rows:
    ratios = list(r["per_seed"].values())
    spread = (f" ({min(ratios):.3f}-{max(ratios):.3f})"
              if len(ratios) > 1 else "")
    losses = list(r["losses"].values())
    table.append(
        [r["method"], f"{r['lr']:g}"]
        + [f"{r['losses'][s]:.3f}" if s in r["losses"] else "-" for s in seeds]
        + [f"{r['mean']:.3f}",
           f"{min(losses):.3f}-{max(losses):.3f}" if len(losses) > 1 else "-",
           f"{r['vs_tuned']:.3f}{spread}" if r["vs_tuned"] else "-",
           f"{r['runs'][0]['state_bytes'] / 2**20:.2f}",
           f"{sum(x['wall_s'] for x in r['runs']) / len(r['runs']):.0f}"])
  shown = {id(x) for r in rows for x in r["runs"]}
  extra = [r for r in runs if id(r) not in shown and run_seed(r, payload) != first]
  walls = [r["wall_s"] for r in runs]
  reused = [r["wall_s"] for r in runs if r.get("reused_from")]
  sources = sorted({r["reused_from"] for r in runs if r.get("reused_from")})
  tuned = rows[0]["tuned"] if rows else None
  split = _split_scale(payload)
  return [
      f"Final eval loss per learning rate at seed {first} (bold: the method's "
      f"best)" + (f"; `adamw_split` is AdamW with `opt.block_lr_scale` = "
                  f"{split}: the blocks' attention and MLP kernels (the ones "
                  f"the subspax methods project) at {split} x lr, embedding, "
                  f"head and norms at lr, as the subspax methods' `scale` does"
                  if split else "") + ":", "",
      _common.markdown_table(["method", *(f"lr {lr:g}" for lr in lrs)], sweep),
      "",
      f"Each method at its best learning rate of that sweep, over seeds "
      f"{', '.join(map(str, seeds))} (the seed sets the init, the batch order "
      f"and the random subspaces). vs tuned AdamW: the mean over the mean "
      f"of `{tuned}` at its best lr (the better AdamW row) over the same "
      f"seeds; in brackets, the min-max over seeds of the ratio at the same "
      f"seed. Wall: mean per run, train.run end to end (a run taken over "
      f"with `--reuse` keeps the time measured where it ran).", "",
      _common.markdown_table(
          ["method", "lr", *(f"seed {s}" for s in seeds), "mean", "min-max",
           "vs tuned AdamW", "state MiB", "wall s"], table),
      "",
      *([("Also run, at a learning rate that is not the row's best at seed "
          f"{first}: " + "; ".join(
              f"`{r['method']}` lr {r['lr']:g} seed {run_seed(r, payload)}: "
              f"{r['final_eval_loss']:.3f}" for r in extra) + "."), ""]
        if extra else []),
      f"{len(walls)} runs, {sum(walls) / 60:.0f} min of wall time in all"
      + (f" ({len(reused)} runs, {sum(reused) / 60:.0f} min, taken over from "
         f"{', '.join(f'`{x}.json`' for x in sources)} with `--reuse`)"
         if reused else "") + ".",
  ]


def _split_scale(payload: dict) -> str:
  scales = {r["block_lr_scale"] for r in payload["runs"]
            if r["method"] in VARIANTS and "block_lr_scale" in r}
  return ", ".join(f"{x:g}" for x in sorted(scales))


def report(payload: dict, default_lr: float) -> str:
  """The Markdown table of a result: per method, the eval loss at the preset
  lr and at its best lr; with several seeds or a `VARIANTS` row, the sweep
  at the first seed and each method's seeds at its best lr instead.

  Example:
    print(report(json.load(open("bench/results/baseline.json")), 3e-3))

  Args:
    payload: A convergence result.
    default_lr: The preset's learning rate.

  Returns:
    Markdown: a paragraph on the setting, the table(s), the machine line.
  """
  runs = payload["runs"]
  if is_baseline(payload):
    any_run = runs[0]
    seeds = sorted({run_seed(r, payload) for r in runs})
    return "\n".join([
        f"Tiny preset (7.4M params, vocab 8192), batch "
        f"{any_run['batch_size']} x seq {any_run['seq_len']}, {any_run['steps']} "
        f"steps = {any_run['tokens']:,} tokens, seeds "
        f"{', '.join(map(str, seeds))}, rank {any_run['rank']}, refresh every "
        f"{any_run['update_interval']} steps, every method at its paper "
        f"defaults, warmup 10% then cosine to 0.1x, eval on "
        f"{payload['eval_batches']} held-out batches. State = exact "
        f"optimizer-state bytes (all params); wall = train.run end to end "
        f"(compile and evals included) on a shared 2-core CPU.", "",
        *_baseline_tables(payload), "",
        _common.machine_line(payload["machine"])])
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
  if is_baseline(payload):
    _plot_baseline(payload, path)
    return
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
  _save(fig, axes, "tiny LLaMA on Shakespeare+Milton: loss vs tokens", path)


def _save(fig, axes, title: str, path: str) -> None:
  """Grid and legend on every panel, the title, and the figure written to `path`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_baseline(payload: dict, path: str) -> None:
  """Eval loss vs tokens at each method's best lr (the sweep seed), and the
  final eval loss vs the learning rate (mean over seeds where several ran)."""
  rows = seed_rows(payload)
  first = sweep_seed(payload)
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  for i, r in enumerate(rows):
    m = r["method"]
    style = "k" if m == "adamw" else "0.45" if m in VARIANTS else f"C{i}"
    run = next(x for x in r["runs"] if run_seed(x, payload) == first)
    x, y = zip(*run["eval"])
    axes[0].plot(x, y, color=style, marker="o", ms=3,
                 ls="--" if m in VARIANTS else "-", label=f"{m} (lr {r['lr']:g})")
    sweep = sorted((x["lr"], x["final_eval_loss"]) for x in payload["runs"]
                   if x["method"] == m and run_seed(x, payload) == first)
    lrs, losses = zip(*sweep)
    axes[1].plot(lrs, losses, color=style, marker="o", ms=4,
                 ls="--" if m in VARIANTS else "-", label=m)
    if len(r["losses"]) > 1:
      axes[1].plot([r["lr"]] * len(r["losses"]), list(r["losses"].values()),
                   color=style, marker="_", ms=12, ls="none")
  axes[0].set_title(f"best learning rate per method (seed {first})")
  axes[0].set_xlabel("training tokens")
  axes[0].set_ylabel("eval loss (nats/token)")
  axes[1].set_title(f"final eval loss vs peak lr (seed {first}; dashes: every "
                    "seed at the best lr)")
  axes[1].set_xscale("log")
  axes[1].set_xlabel("peak learning rate")
  _save(fig, axes, "tiny LLaMA on Shakespeare+Milton: subspace methods vs a "
        "tuned AdamW", path)


def _cases(methods: list[str], lrs: list[float], sweeps: dict[str, list[float]]
           ) -> list[tuple[str, float]]:
  """(method, lr) of the sweep, lr outermost: every method gets the first lr
  before any method gets its second."""
  grid = {m: sweeps.get(m, lrs) for m in methods}
  order = list(dict.fromkeys(lr for m in methods for lr in grid[m]))
  order.sort(key=lambda lr: min(grid[m].index(lr) for m in methods if lr in grid[m]))
  return [(m, lr) for lr in order for m in methods if lr in grid[m]]


def _reusable(names: str, out: str) -> list[tuple]:
  """(name, run, call record) of every run in the --reuse result files."""
  found = []
  for name in filter(None, names.split(",")):
    other = _common.load_json(os.path.join(out, f"{name}.json"))
    if other is None:
      raise SystemExit(f"--reuse {name}: there is no {out}/{name}.json")
    for run in other["runs"]:
      call = other["calls"][run["call"]] if "call" in run else None
      found.append((name, {**run, "seed": run_seed(run, other)}, call))
  return found


def _same_setting(run: dict, cfg, method: str, lr: float) -> bool:
  """Whether an earlier run trained what `cfg` would (method, lr, seed,
  steps, batch, sequence, rank, refresh gap, eval steps)."""
  evals = [x for x, _ in run["eval"]]
  tokens = cfg.batch_size * cfg.seq_len
  want = [s * tokens for s in range(cfg.eval_every, cfg.steps, cfg.eval_every)
          ] if cfg.eval_every else []
  want = list(dict.fromkeys(want + [cfg.steps * tokens]))
  return (run["method"], run["lr"], run["seed"], run["steps"],
          run["batch_size"], run["seq_len"], run["rank"],
          run["update_interval"]) == (
              method, lr, cfg.seed, cfg.steps, cfg.batch_size, cfg.seq_len,
              cfg.opt.rank, cfg.opt.update_interval) and evals == want


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
  parser.add_argument("--seeds", default="",
                      help="comma-separated seeds: the sweep runs at the first, "
                      "each method at its best lr of it at the others "
                      "(default: --seed)")
  parser.add_argument("--sweep", action="append", default=[],
                      metavar="METHOD=LR,LR",
                      help="the learning rates of one method instead of --lrs "
                      "(repeatable)")
  parser.add_argument("--reuse", default="",
                      help="comma-separated result names (bench/results/NAME.json) "
                      "whose runs of the same setting are taken over, not rerun")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "subspax-bench-convergence"))
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs already in the JSON and skip them")
  args = parser.parse_args(argv)
  methods = args.methods.split(",")
  lrs = [float(x) for x in args.lrs.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
  sweeps = {}
  for item in args.sweep:
    method, _, values = item.partition("=")
    if method not in methods or not values:
      parser.error(f"--sweep {item!r}: expected METHOD=LR,LR with METHOD one "
                   f"of --methods ({args.methods})")
    sweeps[method] = [float(x) for x in values.split(",")]
  unknown = [m for m in methods if m not in _common.METHODS and m not in VARIANTS]
  if unknown:
    parser.error(f"--methods: unknown {unknown[0]!r}; choose from "
                 f"{', '.join([*_common.METHODS, *VARIANTS])}")
  args.default_lr = tiny.get_config().opt.learning_rate
  json_path = os.path.join(args.out, f"{args.name}.json")
  earlier = _common.load_json(json_path) if args.resume else None
  runs = earlier["runs"] if earlier else []
  # The order of --methods where it names every method run so far.
  reported = list(dict.fromkeys(
      ([] if {r["method"] for r in runs} <= set(methods) else
       [r["method"] for r in runs]) + methods))
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
  reusable = _reusable(args.reuse, args.out)
  def copy_key(name: str, rec: dict | None) -> tuple[str, str]:
    rec = {k: v for k, v in (rec or {}).items() if k != "reused_from"}
    return name, json.dumps(rec, sort_keys=True)
  # (file, call record) -> its index in payload["calls"], also from earlier calls
  copied = {copy_key(c["reused_from"], c): i for i, c in enumerate(payload["calls"])
            if c.get("reused_from")}

  def ensure(method: str, lr: float, seed: int) -> None:
    """Runs (or takes over) `method` at `lr` and `seed` unless it is there."""
    if any(r["method"] == method and r["lr"] == lr and r["steps"] == args.steps
           and run_seed(r, payload) == seed for r in runs):
      return
    cfg = make_config(method, lr, args, seed)
    earlier = next(((name, run, rec) for name, run, rec in reusable
                    if _same_setting(run, cfg, method, lr)), None)
    if earlier:
      name, run, rec = earlier
      key = copy_key(name, rec)
      if key not in copied:
        payload["calls"].append({**(rec or {}), "reused_from": name})
        copied[key] = len(payload["calls"]) - 1
      runs.append({**run, "reused_from": name, "call": copied[key]})
      print(f"=== {method} lr {lr:g} seed {seed}: from {name}.json, eval loss "
            f"{run['final_eval_loss']:.4f}", flush=True)
    else:
      print(f"=== {method} lr {lr:g} seed {seed}", flush=True)
      runs.append({**run_one(method, lr, args, seed), "call": call})
      print(f"=== {method} lr {lr:g} seed {seed}: eval loss "
            f"{runs[-1]['final_eval_loss']:.4f}, wall {runs[-1]['wall_s']:.0f} s",
            flush=True)
    with open(json_path, "w") as f:
      json.dump(payload, f, indent=1)

  for method, lr in _cases(methods, lrs, sweeps):
    ensure(method, lr, seeds[0])
  # Every further seed: each method at its best lr of the first seed's sweep.
  for seed in seeds[1:]:
    for method in methods:
      swept = [r for r in runs if r["method"] == method and r["steps"] == args.steps
               and run_seed(r, payload) == seeds[0]]
      ensure(method, min(swept, key=lambda r: r["final_eval_loss"])["lr"], seed)
  markdown = report(payload, args.default_lr)
  plot(payload, os.path.join(args.out, f"{args.name}.png"))
  _common.write_results(args.name, payload, markdown, args.out)


if __name__ == "__main__":
  main()

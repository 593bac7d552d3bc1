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

With `--against REV` the same steps of this tree and of git revision REV
(extracted with `git archive`) are compiled in two worker processes
(bench/_step_calls.py) and timed alternately in the same rounds: a change's
effect on step time, measured in one run (`step_time_against.md`).

  python -m bench.step_time
  python -m bench.step_time --presets tiny --methods adamw,subtrack --repeats 3
  python -m bench.step_time --against da5e4c5 --presets tiny,60m
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

from bench import _common
from bench import _step_calls

NAME = "step_time"
AGAINST_NAME = "step_time_against"
PRESETS = _step_calls.PRESETS


def _amortized(times: dict, case: str, interval: int) -> list[float]:
  """Per round, (refresh + (T - 1) plain) / T of `case` (`[side:]method`);
  the plain step where the case has no refresh (AdamW)."""
  plain = times[f"{case}/plain"]
  refresh = times.get(f"{case}/refresh", plain)
  return [(r + (interval - 1) * p) / interval for r, p in zip(refresh, plain)]


def _ratios(times: dict, methods: list[str], interval: int, ref: str) -> dict:
  """plain / refresh / amortized per-round ratios of each method to `ref`'s plain."""
  ratios = {}
  for name in methods:
    p = times[f"{name}/plain"]
    r = times.get(f"{name}/refresh", p)
    amort = _amortized(times, name, interval)
    ratios[name] = {"plain": _common.ratio_stats(p, times[ref]),
                    "refresh": _common.ratio_stats(r, times[ref]),
                    "amortized": _common.ratio_stats(amort, times[ref])}
  return ratios


def bench_preset(preset: str, args) -> dict:
  calls, info = _step_calls.build_calls(preset, args.methods, args.batch)
  repeats = args.repeats or PRESETS[preset][2]
  times = _common.interleaved(calls, repeats=repeats, warmup=1)
  ratios = _ratios(times, args.methods, info["update_interval"], "adamw/plain")
  for name, r in ratios.items():
    print(f"{preset} {name}: plain {r['plain']['median']:.3f}x, refresh "
          f"{r['refresh']['median']:.2f}x, amortized {r['amortized']['median']:.3f}x",
          flush=True)
  return {**info, "repeats": repeats,
          "seconds": {k: _common.summary(v) for k, v in times.items()},
          "vs_adamw": ratios}


class _Worker:
  """`bench/_step_calls.py` serving one source tree's compiled calls."""

  def __init__(self, tree: str, preset: str, args):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_step_calls.py")
    self.proc = subprocess.Popen(
        [sys.executable, script, "--preset", preset, "--methods",
         ",".join(args.methods), "--batch", str(args.batch)],
        cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": tree})
    self.tree = tree

  def ready(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the step worker in {self.tree} exited "
                         f"(status {self.proc.wait()}); its stderr is above")
    return json.loads(line)["ready"]

  def call(self, name: str) -> None:
    self.proc.stdin.write(name + "\n")
    self.proc.stdin.flush()
    if self.proc.stdout.readline().strip() != "done":
      raise RuntimeError(f"the step worker in {self.tree} failed on {name}")

  def close(self) -> None:
    self.proc.communicate("\n", timeout=60)


@contextlib.contextmanager
def _source_tree(rev: str):
  """(this source tree, the files of git revision `rev` extracted into a
  temporary directory)."""
  with tempfile.TemporaryDirectory(prefix="subspax-rev-") as tree:
    archive = subprocess.run(["git", "-C", _common.ROOT, "archive", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    yield _common.ROOT, tree


def bench_against(preset: str, args) -> dict:
  """This tree's calls and revision `args.against`'s, timed alternately in the
  same rounds (two worker processes; the idle one waits on its stdin)."""
  repeats = args.repeats or PRESETS[preset][2]
  with _source_tree(args.against) as (here, there):
    workers = {"this": _Worker(here, preset, args),
               "base": _Worker(there, preset, args)}
    try:
      infos = {side: w.ready() for side, w in workers.items()}
      calls = {}
      for name in infos["this"]["compile_s"]:
        for kind in ("plain", "refresh"):
          if name == "adamw" and kind == "refresh":
            continue
          for side, w in workers.items():
            calls[f"{side}:{name}/{kind}"] = lambda w=w, c=f"{name}/{kind}": w.call(c)
      times = _common.interleaved(calls, repeats=repeats, warmup=1)
    finally:
      for w in workers.values():
        w.close()
  interval = infos["this"]["update_interval"]
  vs_base, vs_adamw = {}, {}
  for name in args.methods:
    plain = {s: times[f"{s}:{name}/plain"] for s in workers}
    amort = {s: _amortized(times, f"{s}:{name}", interval) for s in workers}
    vs_base[name] = {"plain": _common.ratio_stats(plain["this"], plain["base"]),
                     "amortized": _common.ratio_stats(amort["this"], amort["base"])}
    vs_adamw[name] = {s: _common.ratio_stats(plain[s], times[f"{s}:adamw/plain"])[
        "median"] for s in workers}
    print(f"{preset} {name}: this / {args.against} plain "
          f"{vs_base[name]['plain']['median']:.3f}, amortized "
          f"{vs_base[name]['amortized']['median']:.3f}", flush=True)
  return {**infos["this"], "repeats": repeats, "against": args.against,
          "compile_s_base": infos["base"]["compile_s"],
          "seconds": {k: _common.summary(v) for k, v in times.items()},
          "vs_base": vs_base, "plain_vs_adamw": vs_adamw}


def _preset_line(res: dict) -> str:
  return (f"**{res['preset']}** ({res['params'] / 1e6:.1f}M params, batch "
          f"{res['batch']} x seq {res['seq_len']}, vocab {res['vocab']}, "
          f"{res['compute_dtype']} compute, remat {res['remat']}; rank "
          f"{res['rank']}, T = {res['update_interval']}; {res['repeats']} rounds)")


def table_against(results, info) -> str:
  rev = results[0]["against"]
  lines = [
      f"The whole train step of this tree against revision `{rev}`: the same "
      f"steps, compiled in two processes (one per source tree) and timed "
      f"alternately in the same rounds. Ratios are this tree's time over "
      f"`{rev}`'s in the same round, median (min) over rounds; plain = "
      f"non-refresh step, amortized = (refresh + (T-1) plain) / T. The last "
      f"two columns give each tree's plain step over its own AdamW step "
      f"(median). Random tokens, state not donated, unrolled layers.", ""]
  fmt = lambda s: f"{s['median']:.3f} ({s['min']:.3f})"
  for res in results:
    rows = [[name, f"{res['seconds'][f'this:{name}/plain']['median']:.3f}",
             fmt(r["plain"]), fmt(r["amortized"]),
             f"{res['plain_vs_adamw'][name]['this']:.3f}",
             f"{res['plain_vs_adamw'][name]['base']:.3f}"]
            for name, r in res["vs_base"].items()]
    lines += [_preset_line(res), "", _common.markdown_table(
        ["method", "plain step s (median)", f"plain x {rev}",
         f"amortized x {rev}", "plain x AdamW (this)", f"plain x AdamW ({rev})"],
        rows), ""]
  lines.append(_common.machine_line(info))
  return "\n".join(lines)


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
        _preset_line(res), "",
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
  parser.add_argument("--against", default="",
                      help="a git revision: time this tree's steps against "
                           "that revision's, alternately in the same rounds "
                           f"(writes {AGAINST_NAME}.md)")
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the presets saved in <out>/step_time.partial.json")
  args = parser.parse_args()
  args.methods = args.methods.split(",")
  if args.methods[0] != "adamw":
    args.methods = ["adamw"] + [m for m in args.methods if m != "adamw"]
  if args.against:
    _common.run_presets(AGAINST_NAME, args, bench_against, table_against)
  else:
    _common.run_presets(NAME, args, bench_preset, lambda r, i: table(r, args, i))


if __name__ == "__main__":
  main()

"""Shared pieces of the benchmarks: methods, machine info, timing and reports.

Every benchmark writes `bench/results/<name>.json` (all raw numbers, the
machine and the date) and `bench/results/<name>.md` (the table the README
includes), and prints the table.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from configs import base
from train import optimizers
# One definition of peak (argument + temp + output - alias) for the trainer,
# its dry run and every benchmark.
from train.memory import compiled_memory  # pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
METHODS = optimizers.NAMES  # the trainer's registry: adamw, subspax.METHODS, optax_galore


def machine() -> dict[str, Any]:
  """CPU model, core count, JAX devices and versions, and the date (UTC)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import flax, optax  # pylint: disable=import-outside-toplevel,multiple-imports
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "jax_devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "python": platform.python_version()},
  }


def portable(value: Any) -> Any:
  """``value`` with this checkout's root written ``.`` and the temporary
  directory ``$TMPDIR`` (in strings, lists and dicts): results are committed,
  and a path on the machine that ran them means nothing elsewhere."""
  if isinstance(value, str):
    for path, name in ((ROOT, "."), (tempfile.gettempdir(), "$TMPDIR")):
      value = re.sub(re.escape(path) + r"(?![\w.-])", name, value)
    return value
  if isinstance(value, (list, tuple)):
    return [portable(v) for v in value]
  if isinstance(value, dict):
    return {k: portable(v) for k, v in value.items()}
  return value


def call_record(args: Any = None, argv: Sequence[str] | None = None,
                **facts: Any) -> dict[str, Any]:
  """Everything needed to rerun one benchmark invocation.

  Examples:
    >>> import argparse
    >>> record = call_record(argparse.Namespace(steps=2), ["--steps", "2"],
    ...                      batch=8, seq_len=256)
    >>> record["command"], record["batch"], record["args"]
    ('python -m bench --steps 2', 8, {'steps': 2})

  Args:
    args: The parsed arguments (an ``argparse.Namespace`` or a dict).
    argv: The command-line arguments after the program (default
      ``sys.argv[1:]``).
    **facts: What the arguments leave implicit, e.g. ``batch`` and
      ``seq_len`` taken from a preset.

  Returns:
    ``{"command", "args", **facts, "machine"}``: the command as
    ``python -m bench.<name> ...``, the full argument set, the facts and
    :func:`machine` (CPU or device kind, cores, versions, date); paths made
    :func:`portable`.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  module = spec.name if spec is not None and spec.name.startswith("bench") \
      else "bench"
  args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
  return portable({"command": shlex.join(["python", "-m", module, *argv]),
                   "args": args, **facts, "machine": machine()})


def with_call(payload: dict[str, Any], earlier: dict[str, Any] | None,
              record: dict[str, Any]) -> dict[str, Any]:
  """``payload`` with ``calls``: the earlier payload's calls, then ``record``.

  A benchmark that merges into its previous results (``--resume``) keeps
  every call that produced them, so each row can be rerun.
  """
  calls = list((earlier or {}).get("calls", []))
  return {**payload, "calls": calls + [record]}


def load_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class Partial:
  """The finished cases of one benchmark run, saved after each case.

  A long benchmark saves every case's result to `<out>/<name>.partial.json`
  as soon as it has it; run again with `--resume`, it loads that file and
  skips the cases already there. `remove()` once the full results are written.

  Examples:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> partial = Partial(out, "demo")
    >>> partial.get_or_run("a", lambda: {"x": 1})
    {'x': 1}
    >>> Partial(out, "demo", resume=True).cases  # what --resume skips
    {'a': {'x': 1}}
    >>> partial.remove()

  Attributes:
    path: The partial-results file.
    cases: case key -> result (JSON types), the loaded ones first.
    reused: The keys loaded from an earlier run.
  """

  def __init__(self, out: str, name: str, resume: bool = False):
    self.path = os.path.join(out, f"{name}.partial.json")
    self.cases = (load_json(self.path) if resume else None) or {}
    self.reused = set(self.cases)

  def get_or_run(self, key: str, run: Callable[[], Any]) -> Any:
    """The saved result of case `key`, or `run()`'s, saved before returning."""
    if key not in self.cases:
      self.cases[key] = run()
      os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
      with open(self.path, "w") as f:
        json.dump(self.cases, f, indent=1)
    return self.cases[key]

  def remove(self) -> None:
    """Deletes the partial-results file (the run is complete)."""
    if os.path.exists(self.path):
      os.remove(self.path)


def machine_line(info: dict[str, Any]) -> str:
  v = info["versions"]
  return (f"Machine: {info['cpu']} ({info['cpu_count']} cores), JAX devices "
          f"{', '.join(info['jax_devices'])}; jax {v['jax']}, flax {v['flax']}, "
          f"optax {v['optax']}; {info['date']}.")


def opt_config(name: str, *, rank: int, update_interval: int,
               learning_rate: float = 1e-3) -> ml_collections.ConfigDict:
  """The trainer's `opt` section for `name` with the given rank and interval."""
  opt = base.get_base_config().opt
  opt.name = name
  opt.rank = rank
  opt.update_interval = update_interval
  opt.learning_rate = learning_rate
  opt.warmup_steps = 0
  return opt


def build_tx(name: str, *, rank: int, update_interval: int, steps: int = 10_000,
             seed: int = 0):
  """The trainer registry's optimizer (train/optimizers.py), paper defaults."""
  return optimizers.build(
      opt_config(name, rank=rank, update_interval=update_interval), steps, seed)


def time_call(fn: Callable[[], Any], number: int = 1) -> float:
  """Seconds per call of `fn` (which must block until its result is ready)."""
  start = time.perf_counter()
  for _ in range(number):
    fn()
  return (time.perf_counter() - start) / number


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, number: int = 1,
                warmup: int = 1) -> dict[str, list[float]]:
  """Round-robin timing: each repeat times every fn once, in turn.

  Returns:
    name -> seconds per call, one entry per repeat. Methods timed in the same
    rounds see the same machine load, so their ratios are fair even when the
    absolute times are noisy.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(time_call(fn, number))
  return times


def ratio_stats(times: Sequence[float], ref: Sequence[float]) -> dict[str, float]:
  """Per-repeat ratios to the reference (same round), their min and median."""
  ratios = [t / r for t, r in zip(times, ref)]
  return {"min": min(ratios), "median": statistics.median(ratios),
          "ratios": ratios}


def summary(times: Sequence[float]) -> dict[str, float]:
  return {"min": min(times), "median": statistics.median(times), "all": list(times)}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(x):
    if isinstance(x, float):
      return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str,
                  out_dir: str = RESULTS) -> None:
  """Writes <name>.json and <name>.md under out_dir and prints the Markdown."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=1, default=float)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown.rstrip() + "\n")
  print(markdown, flush=True)
  print(f"wrote {out_dir}/{name}.json and {name}.md", flush=True)


# preset name -> config module
PRESETS = {"test": "configs.test", "tiny": "configs.tiny",
           "60m": "configs.llama_60m", "130m": "configs.llama_130m",
           "350m": "configs.llama_350m", "1b": "configs.llama_1b",
           "7b": "configs.llama_7b", "13b": "configs.llama_13b",
           "7b_24gb": "configs.llama_7b_24gb", "13b_40gb": "configs.llama_13b_40gb"}


def preset_config(preset: str, opt_name: str, subspace_layers: bool = False
                  ) -> ml_collections.ConfigDict:
  """A preset's full trainer config with `opt.name` and
  `opt.subspace_layers` (the grass / rso mode, train/reparam.py) set."""
  cfg = importlib.import_module(PRESETS[preset]).get_config()
  cfg.opt.name = opt_name
  cfg.opt.subspace_layers = subspace_layers
  return cfg


def mib(n: float) -> float:
  return n / 2**20


def run_presets(name: str, args: Any,
                run: Callable[[str, Any], dict[str, Any]],
                render: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> None:
  """Runs a per-preset benchmark and writes its results.

  `run(preset, args)` is called for each of the comma-separated
  `args.presets` (each result, which must hold `preset`, `batch` and
  `seq_len`, is saved as it comes, and `args.resume` keeps the saved ones);
  then `<args.out>/<name>.json` (results, machine and the call) and
  `<name>.md` (`render(results, machine)`) are written.
  """
  info = machine()
  partial = Partial(args.out, name, resume=args.resume)
  results = [partial.get_or_run(preset, lambda preset=preset: run(preset, args))
             for preset in args.presets.split(",")]
  record = call_record(args, presets={
      r["preset"]: {"batch": r["batch"], "seq_len": r["seq_len"]} for r in results})
  payload = with_call({"benchmark": name, "machine": info, "args": record["args"],
                       "results": results}, None, record)
  write_results(name, payload, render(results, info), args.out)
  partial.remove()


def tokens_per_step(preset: dict) -> str:
  """"B x L" of a preset's step, or "k x B/k x L" where it accumulates k
  micro-batches."""
  accum = preset.get("grad_accum", 1)
  micro = f"{preset['batch'] // accum} x {preset['seq']}"
  return micro if accum == 1 else f"{accum} x {micro}"


def method_and_rank(preset: dict) -> str:
  """"method rR" of a preset record (APOLLO-Mini is rank 1 whatever
  `opt.rank` says)."""
  rank = 1 if preset["method"] == "apollo_mini" else preset["rank"]
  return f"{preset['method']} r{rank}"

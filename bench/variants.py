"""Loss of option variants of one method on the tiny preset.

What it measures: the runs of bench.convergence (`train.train.run` on the
tiny preset, same seed, data order and schedule; checkpointing off), one per
variant, where a variant is a method plus values of its `opt.<method>` fields
(options of its subspax function, e.g. SubTrack++'s `step` or GaLore's
`align_signs`), given as a dict per variant. The table gives
each variant's final eval loss, its last train loss (mean of the last 10
steps) and wall time. `--update-interval` shortens the refresh interval so a
short run sees several refreshes (the options compared act at refreshes).

Writes bench/results/<name>.{json,md} after every variant; `--merge` adds
variants to an existing result of that name.

  python -m bench.variants --name subtrack_step_loss --steps 100 \\
      --update-interval 10 \\
      --variants "subtrack:{'step': 'normalized'}|subtrack:{}"
"""

import argparse
import ast
import os
import statistics
import tempfile
from unittest import mock

from bench import _common
from bench import convergence


def parse_variants(text: str) -> list[tuple[str, dict]]:
  """``"method:{kwargs}|method:{kwargs}"`` -> [(method, kwargs), ...]."""
  out = []
  for item in text.split("|"):
    method, _, kwargs = item.partition(":")
    kwargs = ast.literal_eval(kwargs.strip() or "{}")
    if not isinstance(kwargs, dict):
      raise ValueError(f"--variants: {item!r} needs method:{{dict}}")
    out.append((method.strip(), kwargs))
  return out


def run_variant(method: str, kwargs: dict, args: argparse.Namespace) -> dict:
  make_config = convergence.make_config

  def with_kwargs(*a, **k):
    cfg = make_config(*a, **k)
    for key, value in kwargs.items():  # an unknown key fails train's validate
      cfg.opt[method][key] = value
    if args.update_interval:
      cfg.opt.update_interval = args.update_interval
    return cfg

  with mock.patch.object(convergence, "make_config", with_kwargs):
    result = convergence.run_one(method, args.lr, args)
  last = [loss for _, loss in result["train_loss"][-10:]]
  return {"method": method, "kwargs": kwargs,
          "final_eval_loss": result["final_eval_loss"],
          "last_train_loss": statistics.mean(last),
          "eval": result["eval"], "wall_s": result["wall_s"],
          "update_interval": result["update_interval"],
          "steps": result["steps"]}


def markdown(name: str, results: list[dict], args: argparse.Namespace,
             info: dict) -> str:
  rows = [[f"{r['method']} {r['kwargs']}", f"{r['final_eval_loss']:.4f}",
           f"{r['last_train_loss']:.4f}", r["wall_s"]] for r in results]
  flags = "".join(f" --{flag.replace('_', '-')} {getattr(args, flag)}"
                  for flag in ("batch_size", "seq_len", "rank", "seed")
                  if getattr(args, flag))
  return "\n".join([
      f"# {name}: option variants on the tiny preset", "",
      _common.machine_line(info), "",
      f"`python -m bench.variants --name {name} --steps {args.steps} "
      f"--update-interval {args.update_interval} --lr {args.lr:g} "
      f"--eval-every {args.eval_every}{flags} "
      f"--variants \"{args.variants}\"`: tiny preset, seed {args.seed}, "
      f"batch {args.batch_size or 'preset'} x seq {args.seq_len or 'preset'}, "
      f"refresh every {results[0]['update_interval']} steps, eval every "
      f"{args.eval_every} steps.", "",
      _common.markdown_table(
          ["variant", "final eval loss", "train loss (last 10 steps)",
           "wall s"], rows), ""])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--variants", required=True,
                      help="method:{kwargs}|method:{kwargs}|...")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--update-interval", type=int, default=0,
                      help="0: the preset's")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--rank", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=0)
  parser.add_argument("--seq-len", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "bench_variants"))
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--merge", action="store_true",
                      help="keep the other variants already in <name>.json")
  args = parser.parse_args()
  info = _common.machine()
  results = []
  previous = _common.load_json(os.path.join(args.out, f"{args.name}.json")) \
      if args.merge else None
  if previous:
    results = previous["results"]
    args.variants = "|".join(
        filter(None, [previous["args"]["variants"], args.variants]))
  for method, kwargs in parse_variants(args.variants):
    if any(r["method"] == method and r["kwargs"] == kwargs for r in results):
      continue
    results.append(run_variant(method, kwargs, args))
    print(results[-1]["method"], kwargs, results[-1]["final_eval_loss"],
          results[-1]["last_train_loss"], flush=True)
    recorded = {k: v for k, v in vars(args).items()
                if k not in ("workdir", "out")}  # no machine paths
    _common.write_results(args.name, {"machine": info, "args": recorded,
                                      "results": results},
                          markdown(args.name, results, args, info), args.out)


if __name__ == "__main__":
  main()

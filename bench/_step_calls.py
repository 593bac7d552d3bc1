"""The timed train-step calls of bench.step_time, in this process or a worker.

`build_calls` jits the trainer's step for each method and returns one
zero-argument call per timed case (`<method>/plain`, `<method>/refresh`).
bench.step_time times them in-process; with `--against REV` it runs this file
as a worker in each source tree (this one and REV's), so that the same calls
of two revisions are timed alternately in one run:

  python bench/_step_calls.py --preset tiny --methods adamw,galore --batch 0

The worker imports the tree it runs in (its working directory comes first on
`sys.path`), compiles every call, prints one JSON line (`{"ready": ...}`),
then answers each name read from stdin by running that call once and printing
`done`; an empty line ends it. It uses only trainer APIs that earlier
revisions share (`optimizers.build`, `train.make_train_step`, the model's
`abstract_model` / `init_params`, `bench._common.opt_config`).
"""

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from typing import Any, Callable

# Run as a worker: the source tree in the working directory is the one timed.
if __name__ == "__main__":
  sys.path[0] = os.getcwd()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import subspax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bench import _common  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def _train_step(graphdef, tx, lr, opt_cfg, params, refresh=None) -> Callable:
  """The trainer's step, with the arguments this tree's trainer passes
  (`refresh`: the ordinary or the refresh step, where the tree's trainer
  compiles them as two programs)."""
  kwargs = {}
  if (opt_cfg.name in subspax.METHODS and "refresh" in inspect.signature(
      train_lib.make_train_step).parameters):
    kwargs["refresh"] = refresh
  overwrites = getattr(optimizers, "overwrites_gradient", None)
  if overwrites and "overwritten" in inspect.signature(
      train_lib.make_train_step).parameters:
    # Older trees take the opt section; newer ones ask the transformation.
    from_tx = "tx" in inspect.signature(overwrites).parameters
    kwargs["overwritten"] = overwrites(tx, params) if from_tx else overwrites(opt_cfg)
  return train_lib.make_train_step(graphdef, tx, lr, **kwargs)


def build_calls(preset: str, methods: list[str], batch: int = 0
                ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
  """One call per timed case of `preset`, compiled, and what describes them.

  Args:
    preset: A key of `PRESETS`.
    methods: Optimizer names (`train.optimizers`); AdamW gets no refresh case.
    batch: The batch size (0: the preset's default in `PRESETS`).

  Returns:
    `(calls, info)`: name (`<method>/plain` or `<method>/refresh`) -> a call
    that runs that step once and waits for it; `info` has the model's size,
    shapes, rank, refresh interval T and the compile seconds per method.
  """
  module, default_batch, _ = PRESETS[preset]
  cfg = importlib.import_module(module).get_config()
  cfg.model.scan = False  # optax.contrib.galore cannot project scanned kernels
  batch_size = batch or default_batch or cfg.batch_size
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  graphdef, _, _ = model_lib.abstract_model(model_cfg)
  params = jax.jit(model_lib.init_params, static_argnums=(0, 1))(model_cfg, cfg.seed)
  tokens = jax.random.randint(jax.random.key(0), (batch_size, cfg.seq_len + 1), 0,
                              model_cfg.vocab_size, jnp.int32)
  rank, interval = cfg.opt.rank, cfg.opt.update_interval
  calls, compile_s = {}, {}
  for name in methods:
    opt_cfg = _common.opt_config(name, rank=rank, update_interval=interval)
    tx = optimizers.build(opt_cfg, cfg.steps, cfg.seed)
    lr = optimizers.schedule(opt_cfg, cfg.steps)
    step, refresh_step = (
        jax.jit(_train_step(graphdef, tx, lr, opt_cfg, params, refresh))
        for refresh in (False, True))
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compiled_refresh = (refresh_step.lower(state, tokens).compile()
                        if name != "adamw" else compiled)
    compile_s[name] = time.perf_counter() - start
    # Step 0: the initial basis.
    state, _ = jax.block_until_ready(compiled_refresh(state, tokens))
    plain = with_count(state, 1)._replace(step=jnp.asarray(1, jnp.int32))
    calls[f"{name}/plain"] = lambda c=compiled, s=plain: jax.block_until_ready(
        c(s, tokens))
    if name != "adamw":
      refresh = with_count(state, interval)._replace(
          step=jnp.asarray(interval, jnp.int32))
      calls[f"{name}/refresh"] = lambda c=compiled_refresh, s=refresh: (
          jax.block_until_ready(c(s, tokens)))
    print(f"{preset} {name}: compiled in {compile_s[name]:.1f} s", file=sys.stderr,
          flush=True)
  info = {"preset": preset, "params": sum(x.size for x in jax.tree.leaves(params)),
          "batch": batch_size, "seq_len": cfg.seq_len, "rank": rank,
          "update_interval": interval, "vocab": model_cfg.vocab_size,
          "remat": model_cfg.remat, "compute_dtype": model_cfg.dtype,
          "compile_s": compile_s}
  return calls, info


def serve(preset: str, methods: list[str], batch: int) -> None:
  """The worker loop: compile, say ready, run each named call on request."""
  calls, info = build_calls(preset, methods, batch)
  print(json.dumps({"ready": info}, default=str), flush=True)
  for line in sys.stdin:
    name = line.strip()
    if not name:
      break
    calls[name]()
    print("done", flush=True)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
  parser.add_argument("--methods", required=True)
  parser.add_argument("--batch", type=int, default=0)
  args = parser.parse_args()
  serve(args.preset, args.methods.split(","), args.batch)

"""Memory of one optimizer update on a single weight matrix, per method.

For a ``--m x --n`` float32 weight at ``--rank`` (default 1024 x 1024, rank
128, the single-matrix case of the memory targets), compiles ``tx.update(grads, state, params)`` with
the gradient and the state donated (as in a train step, where the gradient is
a temporary the optimizer may overwrite) and reports, per method:

* the exact optimizer-state bytes (``subspax.state_bytes``);
* XLA's ``memory_analysis()`` of the compiled update: arguments, temp, output,
  alias, and the peak ``arguments + temp + output - alias``
  (``train.memory.compiled_memory``: the donated buffers are reused for the
  new state and the updates);
* each as a ratio to ``optax.adam``.

Nothing is timed: the figures are exact sizes from the compiler, so they are
the same on every run of the same versions. The JSON records them under
``results`` with the call that produced them (command, arguments, machine,
date, versions; no batch or sequence length: the gradient is an input).

Usage:
  python -m bench.single_matrix [--m 1024 --n 1024 --rank 128]
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import optax

import subspax
from bench import _common
from train import memory
from train import optimizers as train_optimizers



def optimizers(rank: int) -> dict[str, optax.GradientTransformation]:
  """AdamW, optax's GaLore and every subspax method at the same rank and gap."""
  txs = {"optax.adam": optax.adam(1e-3),
         "optax.contrib.galore": optax.contrib.galore(1e-3, rank=rank)}
  for name, factory in subspax.METHODS.items():
    r = train_optimizers.method_rank(name, rank)
    label = name if r == rank else f"{name} (rank {r})"
    txs[label] = factory(1e-3, rank=r, update_interval=200)
    if name == "grassjump":
      txs["grassjump (store_basis=False)"] = subspax.grassjump(
          1e-3, rank=rank, update_interval=200, store_basis=False)
  return txs


def measure(tx, m: int, n: int) -> dict[str, int]:
  """State bytes and compiled memory of one update of an ``m x n`` weight."""
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  mem = memory.compiled_memory(
      jax.jit(tx.update, donate_argnums=(0, 1)).lower(params, state, params).compile())
  return {"state": subspax.state_bytes(state), "arguments": mem["argument"],
          "temp": mem["temp"], "output": mem["output"], "alias": mem["alias"],
          "peak": mem["peak"]}


def markdown(rows: dict[str, dict[str, int]], m: int, n: int, rank: int
             ) -> str:
  base = rows["optax.adam"]
  lines = [f"One update of a {m} x {n} float32 weight, rank {rank} "
           f"(jax {jax.__version__}, {jax.devices()[0].platform}).",
           "", "| method | state MiB | x Adam | args MiB | temp MiB | "
           "peak MiB | peak x Adam |", "|---|---|---|---|---|---|---|"]
  mib = lambda b: f"{b / 2**20:.2f}"
  for name, row in rows.items():
    lines.append(
        f"| {name} | {mib(row['state'])} | {row['state'] / base['state']:.3f}"
        f" | {mib(row['arguments'])} | {mib(row['temp'])} | "
        f"{mib(row['peak'])} | {row['peak'] / base['peak']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, default=1024)
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--out", default="bench/results")
  args = parser.parse_args(argv)
  rows = {name: measure(tx, args.m, args.n)
          for name, tx in optimizers(args.rank).items()}
  table = markdown(rows, args.m, args.n, args.rank)
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  # One weight and its gradient, no model: batch and sequence length do not
  # apply (recorded as None so every results file has the fields).
  record = _common.call_record(args, argv, batch=None, seq_len=None)
  payload = _common.with_call(
      {"benchmark": "single_matrix", "machine": record["machine"],
       "args": record["args"], "results": rows}, None, record)
  (out / "single_matrix.json").write_text(json.dumps(payload, indent=1))
  (out / "single_matrix.md").write_text(table + "\n")


if __name__ == "__main__":
  main()

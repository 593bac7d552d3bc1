"""Memory of one optimizer update on the 56 matrices of LLaMA-60M.

The attention and MLP kernels of LLaMA-60M (d 512, d_ff 1376, 8 layers) as
56 separate leaves (`--layout leaves`, the unrolled model) or as 7 stacked
(8, m, n) leaves (`--layout stacked`, the scanned model). Compiles
`tx.update(grads, state, params)` twice: with gradients and state donated (as
in a train step, `jax.jit(tx.update, donate_argnums=(0, 1))`) and with the
state donated and the gradients kept (`donate_argnums=1`, an update jitted on
its own whose caller still reads the gradients). Reports XLA's temp and the
peak (argument + temp + output - alias) as a ratio to `optax.adam`'s, for
optax.contrib.galore (leaves only) and every subspax method at rank 128
(apollo_mini at rank 1). Nothing is allocated or timed.

  python -m bench.update_memory                    # both layouts, both donations
  python -m bench.update_memory --layouts leaves   # 56 separate leaves
  python -m bench.update_memory --donate grads+state  # the train step's only
  python -m bench.update_memory --quantize_moments quantile  # 8-bit moments
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import subspax
from bench import _common
from train import memory as memory_lib
from train import optimizers

SHAPES = {"q": (512, 512), "k": (512, 512), "v": (512, 512),
          "o": (512, 512), "gate": (512, 1376), "up": (512, 1376),
          "down": (1376, 512)}
LAYERS = 8
NAME = "update_memory"
# What the jitted update donates: argument numbers of (grads, state, params).
DONATIONS = {"grads+state": (0, 1), "state": (1,)}


def params(layout: str) -> dict:
  if layout == "stacked":
    return {name: jax.ShapeDtypeStruct((LAYERS,) + shape, jnp.float32)
            for name, shape in SHAPES.items()}
  return {f"{layer}_{name}": jax.ShapeDtypeStruct(shape, jnp.float32)
          for layer in range(LAYERS) for name, shape in SHAPES.items()}


def measure(tx, tree, donate: tuple[int, ...] = (0, 1)) -> dict:
  """`train.memory.compiled_memory` of `jax.jit(tx.update, donate_argnums=donate)`."""
  state = jax.eval_shape(tx.init, tree)
  compiled = jax.jit(tx.update, donate_argnums=donate).lower(
      tree, state, tree).compile()
  return memory_lib.compiled_memory(compiled)


def state_mib(tx, tree) -> float:
  """Exact bytes of the optimizer state, in MiB."""
  state = jax.eval_shape(tx.init, tree)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20


def table(layout: str, donation: str, rows: dict) -> str:
  base = rows["adam"]["peak"]
  galore = rows.get("optax_galore", {}).get("peak")
  header = [f"method ({layout}; {donation} donated)", "state MiB", "temp MiB", "peak MiB",
            "peak x adam", "peak x optax_galore"]
  return _common.markdown_table(header, [
      [name, row["state"], row["temp"] / 2**20, row["peak"] / 2**20,
       row["peak"] / base, row["peak"] / galore if galore else "-"]
      for name, row in rows.items()])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layouts", default="leaves,stacked")
  parser.add_argument("--donate", default=",".join(DONATIONS),
                      help="what the jitted update donates: grads+state (a "
                      "train step), state (the gradients kept), or both")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--methods", default=",".join(_common.METHODS))
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--quantize_moments", default="off",
                      help="the subspax methods' 8-bit moments: off, linear "
                      "or quantile")
  args = parser.parse_args(argv)
  results, tables = {}, []
  for layout in args.layouts.split(","):
    tree = params(layout)
    txs = {"adam": optax.adam(1e-3)}
    if layout == "leaves":  # optax.contrib.galore projects 2-D leaves only
      txs["optax_galore"] = optax.contrib.galore(1e-3, rank=args.rank)
    for name in args.methods.split(","):
      if name not in ("adamw", "optax_galore"):
        rank = optimizers.method_rank(name, args.rank)  # apollo_mini: 1
        txs[name] = subspax.METHODS[name](
            1e-3, rank, 200, quantize_moments=args.quantize_moments)
    results[layout] = {}
    for donation in args.donate.split(","):
      rows = {}
      for name, tx in txs.items():
        rows[name] = {**measure(tx, tree, DONATIONS[donation]),
                      "state": state_mib(tx, tree)}
        print(f"{layout} {donation} {name}: temp "
              f"{rows[name]['temp'] / 2**20:.1f} MiB, peak "
              f"{rows[name]['peak'] / 2**20:.1f} MiB", flush=True)
      results[layout][donation] = rows
      tables.append(table(layout, donation, rows))
  record = _common.call_record(args, argv, batch=None, seq_len=None)
  payload = _common.with_call(
      {"benchmark": NAME, "machine": record["machine"], "args": record["args"],
       "results": results}, None, record)
  note = (f"One `tx.update` of the attention "
          f"and MLP kernels of LLaMA-60M, rank {args.rank}, jitted with the "
          f"gradients and the state donated (`donate_argnums=(0, 1)`, as in a "
          f"train step) or with the state only (`donate_argnums=1`: the "
          f"caller keeps the gradients, so an update that overwrites them "
          f"in place works on a copy): 56 separate "
          f"leaves, or 7 stacked (8, m, n) leaves; subspax moments "
          f"quantize_moments={args.quantize_moments!r}. Peak = argument + temp + "
          f"output - alias (`train.memory.compiled_memory`); state = exact "
          f"optimizer-state bytes. optax.contrib.galore projects the larger "
          f"side of each matrix (subspax: the smaller, as galore-torch), so "
          f"its state is smaller on the rectangular MLP kernels.")
  _common.write_results(NAME, payload, note + "\n\n" + "\n\n".join(tables),
                        args.out)


if __name__ == "__main__":
  main()

"""Memory of one optimizer update on the 56 matrices of LLaMA-60M.

The attention and MLP kernels of LLaMA-60M (d 512, d_ff 1376, 8 layers) as
56 separate leaves (`--layout leaves`, the unrolled model) or as 7 stacked
(8, m, n) leaves (`--layout stacked`, the scanned model). Compiles
`tx.update(grads, state, params)` with gradients and state donated and reports
XLA's temp and the peak (argument + temp + output - alias) as a ratio to
`optax.adam`'s, for optax.contrib.galore (leaves only) and every subspax
method at rank 128. Nothing is allocated or timed.

  python -m bench.update_memory                    # 56 separate leaves
  python -m bench.update_memory --layout stacked
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import subspax
from bench import _common
from train import memory as memory_lib

SHAPES = {"q": (512, 512), "k": (512, 512), "v": (512, 512),
          "o": (512, 512), "gate": (512, 1376), "up": (512, 1376),
          "down": (1376, 512)}
LAYERS = 8


def params(layout: str) -> dict:
  if layout == "stacked":
    return {name: jax.ShapeDtypeStruct((LAYERS,) + shape, jnp.float32)
            for name, shape in SHAPES.items()}
  return {f"{layer}_{name}": jax.ShapeDtypeStruct(shape, jnp.float32)
          for layer in range(LAYERS) for name, shape in SHAPES.items()}


def measure(tx, tree) -> dict:
  state = jax.eval_shape(tx.init, tree)
  compiled = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
      tree, state, tree).compile()
  return memory_lib.compiled_memory(compiled)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layout", choices=("leaves", "stacked"),
                      default="leaves")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--methods", default=",".join(_common.METHODS))
  args = parser.parse_args()
  tree = params(args.layout)
  txs = {"adam": optax.adam(1e-3)}
  if args.layout == "leaves":
    txs["optax_galore"] = optax.contrib.galore(1e-3, rank=args.rank)
  for name in args.methods.split(","):
    if name in ("adamw", "optax_galore"):
      continue
    txs[name] = getattr(subspax, name)(1e-3, args.rank, 200)
  print(f"| method ({args.layout}) | temp MiB | peak MiB | peak x adam |")
  print("|---|---|---|---|")
  base = None
  for name, tx in txs.items():
    mem = measure(tx, tree)
    base = base or mem["peak"]
    print(f"| {name} | {mem['temp'] / 2**20:.1f} | {mem['peak'] / 2**20:.1f} "
          f"| {mem['peak'] / base:.3f} |", flush=True)


if __name__ == "__main__":
  main()

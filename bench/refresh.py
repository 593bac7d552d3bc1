"""Refresh cost: one subspace refresh per method, and the steps around it.

What it measures, on float32 gradients of shape 4096 x 1024 and 2048 x 5461
(a LLaMA-1B MLP kernel) at ranks 128, 256 and 512, every call jitted, warmed
up (compile excluded) and timed to `block_until_ready`:

* the policies alone, called directly on the canonical (d, D) matrix (d the
  smaller side, as the core calls them; subspax/_policies.py):
  - `galore_svd`: `SvdSubspace().refresh` (full reduced SVD);
  - `subtrack_geodesic`: `GeodesicSubspace().refresh` (SubTrack++ step);
  - `grasswalk_step`: `GeodesicSubspace(eta=0.1, step="angle",
    tangent="random").refresh`;
  - `grassjump_qr`: `RandomSubspace().refresh` (Haar basis, one thin QR);
  - `grass_select`: `RowSubspace().refresh` (row norms, Gumbel top-k);
  - `range_finder`: `GeodesicSubspace().initial` (randomized initial basis);
* whole updates `tx.update(grads, state)` on a `{'w': matrix}` tree of the
  method's alias `subspax.<method>(1e-3, rank, update_interval=T)`:
  - `<method>/plain`: a step that is not a refresh (count 1, T = 10**6);
  - `<method>/refresh`: a refresh that is not the first (count 2, T = 2:
    the policy's refresh plus the moment policy, e.g. the rotation);
  and the same for `optax.contrib.galore` (`optax_galore/...`, same rank).
* the reference: one `optax.adam(1e-3)` update of the same matrix.

All calls of one (shape, rank) are timed round-robin, `--repeats` rounds, so
every ratio compares calls under the same machine load; the tables give the
median (and min) over rounds of time / AdamW time of the same round.

  python -m bench.refresh
  python -m bench.refresh --shapes 4096x1024 --ranks 128 --repeats 3
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import subspax

from bench import _common
from train import optimizers

NAME = "refresh"
TX_METHODS = tuple(subspax.METHODS)


def policies() -> dict:
  return {
      "galore_svd": ("refresh", subspax.SvdSubspace()),
      "subtrack_geodesic": ("refresh", subspax.GeodesicSubspace()),
      "grasswalk_step": ("refresh", subspax.GeodesicSubspace(
          eta=0.1, step="angle", tangent="random")),
      "grassjump_qr": ("refresh", subspax.RandomSubspace()),
      "grass_select": ("refresh", subspax.RowSubspace()),
      "range_finder": ("initial", subspax.GeodesicSubspace()),
  }


def make_tx(method: str, rank: int, interval: int):
  if method == "optax_galore":
    return optax.contrib.galore(1e-3, rank=rank, update_proj_gap=interval)
  return subspax.METHODS[method](
      1e-3, rank=optimizers.method_rank(method, rank), update_interval=interval)


def state_at(tx, params, grads, count: int):
  """The state after `count` updates (so the next update runs at `count`)."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(count):
    _, state = update(grads, state, params)
  return jax.block_until_ready(state)


def calibrated(fn, target_s: float):
  """fn repeated so that one timed call lasts about target_s (>= 1 run)."""
  jax.block_until_ready(fn())  # compile
  once = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    once = min(once, time.perf_counter() - start)
  number = max(1, int(target_s / max(once, 1e-6)))

  def run():
    for _ in range(number):
      out = fn()
    jax.block_until_ready(out)

  return run, number


def bench_case(shape, rank: int, args) -> dict:
  m, n = shape
  key = jax.random.key(0)
  g = jax.random.normal(key, shape, jnp.float32)
  canonical = g if m <= n else g.T  # (d, D), d the smaller side
  d = canonical.shape[0]
  fns, numbers = {}, {}

  def add(name, fn):
    fns[name], numbers[name] = calibrated(fn, args.target_s)

  adam = optax.adam(1e-3)
  params, grads = {"w": jnp.zeros(shape, jnp.float32)}, {"w": g}
  adam_update = jax.jit(adam.update)
  adam_state = adam.init(params)
  add("adamw", lambda: adam_update(grads, adam_state, params))

  # A converged-looking orthonormal basis for the geodesic steps.
  s0 = subspax.GeodesicSubspace().initial(canonical, jax.random.key(1), rank)
  for name, (which, policy) in policies().items():
    if which == "initial":
      f = jax.jit(lambda g_, k_, p=policy: p.initial(g_, k_, rank))
      add(name, lambda f=f: f(canonical, key))
    else:
      basis = s0 if policy.basis_type is subspax.DenseBasis else policy.zeros(d, rank)
      f = jax.jit(lambda b_, g_, k_, p=policy: p.refresh(b_, g_, k_, rank))
      add(name, lambda f=f, b=basis: f(b, canonical, key))

  for method in args.methods:
    for kind, interval, count in (("plain", 10**6, 1), ("refresh", 2, 2)):
      tx = make_tx(method, rank, interval)
      state = state_at(tx, params, grads, count)
      update = jax.jit(tx.update)
      add(f"{method}/{kind}",
          lambda u=update, s=state: u(grads, s, params))

  batched = _common.interleaved(fns, repeats=args.repeats, warmup=0)
  times = {k: [t / numbers[k] for t in v] for k, v in batched.items()}
  out = {"shape": list(shape), "rank": rank, "number": numbers,
         "seconds": {k: _common.summary(v) for k, v in times.items()},
         "vs_adamw": {k: _common.ratio_stats(v, times["adamw"])
                      for k, v in times.items()}}
  if "galore_svd" in times and "subtrack_geodesic" in times:
    out["svd_over_geodesic"] = _common.ratio_stats(times["galore_svd"],
                                                   times["subtrack_geodesic"])
  for method in args.methods:
    if f"{method}/plain" in times:
      out["vs_adamw"][f"{method}/amortized"] = {
          "median": statistics.median(
              (r + (args.interval - 1) * p) / args.interval / a
              for r, p, a in zip(times[f"{method}/refresh"],
                                 times[f"{method}/plain"], times["adamw"]))}
  print(f"{shape} r={rank}: " + ", ".join(
      f"{k} {v['median']:.2f}x" for k, v in out["vs_adamw"].items()), flush=True)
  return out


def table(results, args, info) -> str:
  cases = [(tuple(r["shape"]), r["rank"]) for r in results]
  head = ["call"] + [f"{m}x{n} r{r}" for (m, n), r in cases]
  names = list(results[0]["vs_adamw"])
  fmt = lambda s: (f"{s['median']:.2f} ({s['min']:.2f})" if "min" in s
                   else f"{s['median']:.2f}")
  rows = [[name] + [fmt(r["vs_adamw"][name]) for r in results] for name in names]
  adam_ms = [f"{1e3 * r['seconds']['adamw']['median']:.1f}" for r in results]
  rows.insert(0, ["adamw (ms, median)"] + adam_ms)
  if "svd_over_geodesic" in results[0]:
    rows.append(["**SVD / SubTrack++ refresh**"]
                + [fmt(r["svd_over_geodesic"]) for r in results])
  return "\n".join([
      f"Time of one call as a ratio to one optax.adam update of the same matrix: "
      f"median (min) over {args.repeats} interleaved rounds; first row is "
      f"AdamW's own time in ms. Policies act on the canonical (d, D) matrix. "
      f"`/plain` = whole `tx.update` at a non-refresh step, `/refresh` = at a "
      f"(non-initial) refresh step, `/amortized` = (refresh + (T-1) plain) / T "
      f"with T = {args.interval}. Last row: SVD refresh time / SubTrack++ "
      f"refresh time.", "",
      _common.markdown_table(head, rows), "", _common.machine_line(info)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="4096x1024,2048x5461")
  parser.add_argument("--ranks", default="128,256,512")
  parser.add_argument("--methods", default=",".join(TX_METHODS + ("optax_galore",)))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--target-s", type=float, default=0.1,
                      help="repeat fast calls so one timed sample lasts this long")
  parser.add_argument("--interval", type=int, default=200,
                      help="T for the amortized row")
  parser.add_argument("--out", default=_common.RESULTS)
  parser.add_argument("--resume", action="store_true",
                      help="keep the cases saved in <out>/refresh.partial.json")
  args = parser.parse_args()
  args.methods = [m for m in args.methods.split(",") if m]
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  info = _common.machine()
  partial = _common.Partial(args.out, NAME, resume=args.resume)
  results = [partial.get_or_run(f"{shape[0]}x{shape[1]}|{r}",
                                lambda shape=shape, r=r: bench_case(shape, int(r), args))
             for shape in shapes for r in args.ranks.split(",")]
  record = _common.call_record(args)
  payload = _common.with_call({"benchmark": NAME, "machine": info,
                               "args": record["args"], "results": results},
                              None, record)
  _common.write_results(NAME, payload, table(results, args, info), args.out)
  partial.remove()


if __name__ == "__main__":
  main()

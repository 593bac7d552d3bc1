"""SubTrack++'s geodesic step rule: does one refresh lower the projection error?

What it measures, per step rule (subspax/_policies.py, `GeodesicSubspace`):
`normalized` with the paper scripts' eta = 10, and
`optimal` (the closed-form best angle along the geodesic) damped by several
factors. Every case is a float32 gradient of shape d x D with a decaying
spectrum (singular values 0.85^k) and an orthonormal d x r basis S; F(S) =
||G - S S^T G||_F^2. Trials run in one jitted `lax.map` per case and shape (batched LAPACK calls
can deadlock the CPU runtime), `--trials` of them (default 200).

* `tracking`: S = top-r of a gradient G0; the refresh sees G = G0 + noise with
  ||noise||_F = 10% of ||G0||_F (S already tracks G).
* `random`: S Haar-random, G unrelated (S far from G's subspace).
* `drift`: a gradient whose singular vectors random-walk (each refresh
  U <- qr(U + 0.05 Z), same for V) plus 20% noise; S starts at top-r of G_0
  and takes one step per refresh with G_t for 20 refreshes. The score is the
  held-out error F(S_t, G_{t+1}) / ||G_{t+1}||_F^2 (S is used on the *next*
  interval's gradients), averaged over refreshes and trials; exact SVD of G_t
  (GaLore) and the frozen S_0 are the references.

Columns: the fraction of refreshes that lowered F on the gradient they saw
(`decrease rate`), the median relative change of F, and for `drift` the mean
held-out relative error.

  python -m bench.subtrack_step --trials 20      # ~20 min on a busy 2-core CPU
  python -m bench.subtrack_step                  # 200 trials
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import subspax

from bench import _common

NAME = "subtrack_step"
SHAPES = ((32, 96, 4), (64, 128, 8), (128, 256, 32))
DAMPINGS = (0.25, 0.5, 0.75, 1.0)
NOISE_TRACKING = 0.1
NOISE_DRIFT = 0.2
DRIFT = 0.05
REFRESHES = 20


def rules() -> dict:
  out = {"normalized, eta=10 (paper scripts)": subspax.GeodesicSubspace(
      eta=10.0, step="normalized")}
  for damping in DAMPINGS:
    out[f"optimal, eta={damping:g}"] = subspax.GeodesicSubspace(
        eta=damping, step="optimal")
  return out


def _spectrum(k: int) -> jax.Array:
  return 0.85 ** jnp.arange(k, dtype=jnp.float32)


def _orthonormal(x):
  """Q of the thin QR of ``x`` with R's diagonal made non-negative (unique)."""
  q, r = jnp.linalg.qr(x)
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)


def _haar(key, d, r):
  """A Haar-random ``d x r`` orthonormal basis (Mezzadri 2007)."""
  return _orthonormal(jax.random.normal(key, (d, r), jnp.float32))


def _top(g, r):
  """The top-``r`` left singular vectors of ``g`` (GaLore's refresh)."""
  return jnp.linalg.svd(g, full_matrices=False)[0][:, :r]


def _low_rank(u, v):
  k = min(u.shape[1], v.shape[1])
  return (u[:, :k] * _spectrum(k)) @ v[:, :k].T


def _noisy(key, g, level):
  noise = jax.random.normal(key, g.shape)
  return g + level * jnp.linalg.norm(g) / jnp.linalg.norm(noise) * noise


def _error(s, g):
  return jnp.sum(jnp.square(g - s @ (s.T @ g)))


def _one_step(policy, key, d, big_d, r, case):
  """(F before, F after) of one refresh in a `tracking` or `random` case."""
  ku, kv, kn, ks = jax.random.split(key, 4)
  k = min(d, big_d)
  g0 = _low_rank(_haar(ku, d, k), _haar(kv, big_d, k))
  if case == "tracking":
    s = _top(g0, r)
    g = _noisy(kn, g0, NOISE_TRACKING)
  else:
    s = _haar(ks, d, r)
    g = g0
  new = policy.refresh(subspax.DenseBasis(s), g, ks, r).s
  return _error(s, g), _error(new, g)


def _drift(update, key, d, big_d, r):
  """Held-out errors and seen-F changes of one drifting sequence."""
  k = min(d, big_d)
  ku, kv, key = jax.random.split(key, 3)
  u, v = _haar(ku, d, k), _haar(kv, big_d, k)

  def gradient(key, u, v):
    kz, kw, kn = jax.random.split(key, 3)
    u = _orthonormal(u + DRIFT * jax.random.normal(kz, u.shape))
    v = _orthonormal(v + DRIFT * jax.random.normal(kw, v.shape))
    return u, v, _noisy(kn, _low_rank(u, v), NOISE_DRIFT)

  u, v, g = gradient(jax.random.fold_in(key, 0), u, v)
  s = _top(g, r)

  def body(carry, i):
    s, u, v = carry
    u, v, g = gradient(jax.random.fold_in(key, i), u, v)
    new = update(s, g, jax.random.fold_in(key, 1000 + i))
    u2, v2, g_next = gradient(jax.random.fold_in(key, i + 1), u, v)
    del u2, v2
    held_out = _error(new, g_next) / jnp.sum(jnp.square(g_next))
    return (new, u, v), (held_out, _error(s, g), _error(new, g))

  _, out = jax.lax.scan(body, (s, u, v), jnp.arange(1, REFRESHES + 1))
  return out


def _updates(r: int) -> dict:
  """Every rule and reference as ``(s, g, key) -> new s``."""
  out = {name: (lambda s, g, k, p=p: p.refresh(
      subspax.DenseBasis(s), g, k, r).s)
         for name, p in rules().items()}
  out["exact SVD of G_t (GaLore)"] = lambda s, g, k: (
      _top(g, r))
  out["frozen S_0"] = lambda s, g, k: s
  return out


def measure(trials: int) -> dict:
  """All rules of one shape in one jitted program per case."""
  results = {}
  keys = jax.random.split(jax.random.key(0), trials)
  for d, big_d, r in SHAPES:
    shape = f"{d}x{big_d} r={r}"
    rows = {name: {} for name in _updates(r)}
    for case in ("tracking", "random"):
      f = jax.jit(functools.partial(jax.lax.map, lambda k, case=case, d=d, big_d=big_d, r=r: {
          name: _one_step(p, k, d, big_d, r, case)
          for name, p in rules().items()}))
      for name, (before, after) in f(keys).items():
        before, after = np.asarray(before), np.asarray(after)
        rows[name][case] = {"decrease_rate": float(np.mean(after <= before)),
                            "median_change": float(np.median(after / before - 1))}
    f = jax.jit(functools.partial(jax.lax.map, lambda k, d=d, big_d=big_d, r=r: {
        name: _drift(update, k, d, big_d, r)
        for name, update in _updates(r).items()}))
    for name, (held_out, before, after) in f(keys).items():
      rows[name]["drift"] = {
          "held_out": float(np.mean(np.asarray(held_out))),
          "decrease_rate": float(np.mean(np.asarray(after) <= np.asarray(before)))}
      print(shape, name, rows[name], flush=True)
    results[shape] = rows
  return results


def markdown(results: dict, trials: int, info: dict) -> str:
  lines = [
      "# SubTrack++ step rule: projection error after one refresh", "",
      _common.machine_line(info), "",
      f"`python -m bench.subtrack_step --trials {trials}`; {trials} trials per "
      "case and shape. F = ||G - S S^T G||_F^2. `tracking`: S = top-r of G0, "
      "G = G0 + 10% noise; `random`: Haar S; `drift`: 20 refreshes of a "
      "random-walking gradient with 20% noise, held-out error = "
      "F(S_t, G_{t+1}) / ||G_{t+1}||^2 (lower is better).", ""]
  for shape, rows in results.items():
    lines.append(f"## {shape}")
    lines.append("")
    table = []
    for name, row in rows.items():
      cells = [name]
      for case in ("tracking", "random"):
        if case in row:
          cells += [f"{row[case]['decrease_rate']:.0%}",
                    f"{row[case]['median_change']:+.1%}"]
        else:
          cells += ["", ""]
      cells += [f"{row['drift']['held_out']:.4f}"]
      table.append(cells)
    lines.append(_common.markdown_table(
        ["rule", "tracking: F decreased", "tracking: median dF/F",
         "random: F decreased", "random: median dF/F",
         "drift: held-out error"], table))
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=200)
  parser.add_argument("--out", default=_common.RESULTS)
  args = parser.parse_args()
  info = _common.machine()
  results = measure(args.trials)
  _common.write_results(NAME, {"machine": info, "trials": args.trials,
                               "results": results},
                        markdown(results, args.trials, info), args.out)


if __name__ == "__main__":
  main()

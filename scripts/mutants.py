"""Mutation check: do the tests notice deliberate bugs in the math?

Each mutant is one small, named source edit: an exact ``(file, old, new)``
replacement whose ``old`` text must occur exactly once in the file. For every
mutant the script copies the repository's packages and tests into a temporary
directory, applies the edit there, runs the mutant's targeted tests with
``pytest -x -q`` (``PYTHONPATH`` pointing at the copy) and prints a table:

  mutant | killed / survived / stale | killing test | seconds

"stale" means the ``old`` text no longer matches exactly once (the source
changed under the mutant): fix the mutant, it is not skipped silently. Every
listed mutant must be killed; the exit status is non-zero otherwise.

Usage (from the repository root; each mutant takes 10-60 s on 2 CPU cores):

  .venv/bin/python scripts/mutants.py --jobs 1
  .venv/bin/python scripts/mutants.py --only rotate-nu-drops-mean
  .venv/bin/python scripts/mutants.py --src ../other-checkout --list my.py

``--list FILE`` replaces the built-in list with the ``MUTANTS`` of a Python
file (a list of ``Mutant``; ``from mutants import Mutant`` works there).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a copy holds: the packages the tests import, the tests, the configs.
COPIED = ("subspax", "train", "configs", "bench", "tests", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One deliberate bug.

  Attributes:
    name: Short unique name (``--only`` selects by it).
    path: File to edit, relative to the repository root.
    old: Exact text to replace; must occur exactly once.
    new: Replacement text.
    tests: pytest arguments that must catch it (node ids, ``-k`` filters).
    why: What the edit breaks, in words.
  """

  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str


MATH = "tests/test_math.py"
PROPS = "tests/test_properties.py"
TABLE = "tests/test_optax_table.py"
REPARAM = "tests/test_reparam.py"

MUTANTS = [
    # The five mutants of the audit that first motivated tests/test_math.py.
    Mutant(
        "rotate-nu-drops-mean", "subspax/_core.py",
        "new_nu = jnp.abs(jnp.square(c) @ (nu32 - jnp.square(mu32))\n"
        "                   + jnp.square(new_mu))",
        "new_nu = jnp.square(c) @ nu32",
        (MATH, "-k", "rotates or golden"),
        "LDAdam's variance correction dropped: nu_new = C^2 nu"),
    Mutant(
        "subtrack-keeps-moments", "subspax/_methods.py",
        'rank, update_interval, scale=scale, moments="rotate", recovery=recovery,'
        '\n      recovery_limit=recovery_limit, key=key,'
        '\n      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))'
        '\n\n\ndef scale_by_grasswalk(',
        'rank, update_interval, scale=scale, moments="keep", recovery=recovery,'
        '\n      recovery_limit=recovery_limit, key=key,'
        '\n      **_adam_kwargs(b1, b2, eps, side, projected, mu_dtype, nu_dtype))'
        '\n\n\ndef scale_by_grasswalk(',
        (MATH, "-k", "rotates and subtrack"),
        'SubTrack++ with moments="keep" instead of "rotate"'),
    Mutant(
        "projected-update-times-zero", "subspax/_core.py",
        "  return layout.from_matrices(stack, g.dtype), ProjectedState(",
        "  return layout.from_matrices(0 * stack, g.dtype), ProjectedState(",
        (MATH, "-k", "only_projected"),
        "every projected update multiplied by 0"),
    Mutant(
        "limiter-not-applied", "subspax/_core.py",
        "  return factor * phi, last_norm",
        "  return phi, last_norm",
        (MATH, "-k", "recovery_update"),
        "norm-growth limiter computed and stored but not applied"),
    Mutant(
        "recovery-term-removed", "subspax/_core.py",
        "stack = matrix.write_update(direction, phi, residual_of=reduced)",
        "stack = matrix.write_update(direction)",
        (MATH, "-k", "recovery_update"),
        "the recovery term left out of the update"),
]


@dataclasses.dataclass
class Result:
  mutant: Mutant
  status: str  # "killed", "survived", "stale"
  detail: str
  seconds: float


def _copy_repo(src: str, dst: str) -> None:
  ignore = shutil.ignore_patterns("__pycache__", "*.png", ".pytest_cache")
  for name in COPIED:
    source = os.path.join(src, name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(dst, name), ignore=ignore)
    elif os.path.exists(source):
      shutil.copy2(source, os.path.join(dst, name))


def _apply(mutant: Mutant, root: str) -> str | None:
  """Applies the edit in ``root``; returns why it is stale, or None."""
  path = os.path.join(root, mutant.path)
  if not os.path.exists(path):
    return f"{mutant.path} does not exist"
  with open(path) as f:
    text = f.read()
  count = text.count(mutant.old)
  if count != 1:
    return f"old text found {count} times in {mutant.path}"
  with open(path, "w") as f:
    f.write(text.replace(mutant.old, mutant.new))
  return None


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def _run_tests(root: str, tests: tuple[str, ...], timeout: float):
  """``pytest -x -q`` in ``root``; returns (returncode, output)."""
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu",
             OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
  command = [sys.executable, "-m", "pytest", "-x", "-q", "-p",
             "no:cacheprovider", *tests]
  try:
    done = subprocess.run(command, cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, "timed out"
  return done.returncode, done.stdout + done.stderr


def check(mutant: Mutant, src: str, timeout: float) -> Result:
  """Runs one mutant in a fresh copy of ``src``."""
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="mutant-") as root:
    _copy_repo(src, root)
    stale = _apply(mutant, root)
    if stale:
      return Result(mutant, "stale", stale, time.time() - start)
    code, output = _run_tests(root, mutant.tests, timeout)
  seconds = time.time() - start
  if code == 0:
    return Result(mutant, "survived", "all selected tests pass", seconds)
  if code in (4, 5):  # usage error (no such file) / no test selected
    return Result(mutant, "stale", f"the test selection is invalid (pytest "
                  f"exit {code})", seconds)
  if code is None:
    return Result(mutant, "killed", "timeout", seconds)
  failed = _FAILED.findall(output)
  detail = failed[0] if failed else f"pytest exit {code} (collection error)"
  return Result(mutant, "killed", detail, seconds)


def _table(results: list[Result]) -> str:
  rows = [("mutant", "result", "killing test / note", "s")]
  rows += [(r.mutant.name, r.status, r.detail, f"{r.seconds:.0f}")
           for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
           for row in rows]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", default=REPO,
                      help="repository root whose files are mutated "
                           "(default: this repository)")
  parser.add_argument("--only", action="append", default=[],
                      help="run only this mutant (repeatable)")
  parser.add_argument("--list", dest="mutant_file",
                      help="a Python file whose MUTANTS replace the built-in "
                           "list")
  parser.add_argument("--jobs", type=int, default=1,
                      help="mutants run in parallel (default 1)")
  parser.add_argument("--timeout", type=float, default=900,
                      help="seconds per mutant before it counts as killed")
  args = parser.parse_args(argv)

  mutants = MUTANTS
  if args.mutant_file:
    sys.modules.setdefault("mutants", sys.modules[__name__])
    mutants = runpy.run_path(args.mutant_file)["MUTANTS"]
  names = [m.name for m in mutants]
  if len(set(names)) != len(names):
    parser.error("mutant names must be unique")
  unknown = set(args.only) - set(names)
  if unknown:
    parser.error(f"--only: unknown mutant(s) {sorted(unknown)}; "
                 f"known: {', '.join(names)}")
  if args.only:
    mutants = [m for m in mutants if m.name in args.only]
  src = os.path.abspath(args.src)

  start = time.time()
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = [pool.submit(check, m, src, args.timeout) for m in mutants]
    results = []
    for future in futures:
      results.append(future.result())
      r = results[-1]
      print(f"{r.mutant.name}: {r.status} ({r.detail}, {r.seconds:.0f} s)",
            file=sys.stderr, flush=True)
  print(_table(results))
  counts = {s: sum(r.status == s for r in results)
            for s in ("killed", "survived", "stale")}
  print(f"\n{counts['killed']} killed, {counts['survived']} survived, "
        f"{counts['stale']} stale, of {len(results)} mutants in "
        f"{time.time() - start:.0f} s (src {src}, jobs {args.jobs})")
  return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())

"""Mutation check: do the tests notice deliberate bugs in the math?

Each mutant is one small, named source edit: an exact ``(file, old, new)``
replacement whose ``old`` text must occur exactly once in the file. For every
mutant the script copies the repository's packages and tests into a temporary
directory, applies the edit there, runs the mutant's targeted tests with
``pytest -x -q`` (``PYTHONPATH`` pointing at the copy) and prints a table:

  mutant | killed / survived / stale | killing test | seconds

"stale" means the ``old`` text no longer matches exactly once (the source
changed under the mutant) or the test selection matches no test: fix the
mutant, it is not skipped silently. "timeout" means the tests gave no verdict
in ``--timeout`` seconds (or pytest was killed). Every listed mutant must be killed; the exit status
is non-zero otherwise.

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
ROUNDING = "tests/test_rounding.py"
OPTIONS = "tests/test_options.py"

MUTANTS = [
    # The five mutants of the audit that first motivated tests/test_math.py.
    Mutant(
        "rotate-nu-drops-mean", "subspax/_transitions.py",
        "new_nu = jnp.abs(jnp.square(c) @ (nu32 - jnp.square(mu32))\n"
        "                   + jnp.square(new_mu))",
        "new_nu = jnp.square(c) @ nu32",
        (MATH, "-k", "rotates or golden"),
        "LDAdam's variance correction dropped: nu_new = C^2 nu"),
    Mutant(
        "subtrack-keeps-moments", "subspax/_methods.py",
        'tangent="gradient",\n                                      init=init)\n'
        '  return _core.scale_by_subspace_adam(\n      policy, rank, '
        'update_interval, b1=b1, b2=b2, eps=eps, scale=scale,\n'
        '      moments="rotate",',
        'tangent="gradient",\n                                      init=init)\n'
        '  return _core.scale_by_subspace_adam(\n      policy, rank, '
        'update_interval, b1=b1, b2=b2, eps=eps, scale=scale,\n'
        '      moments="keep",',
        (MATH, "-k", "rotates and subtrack"),
        'SubTrack++ with moments="keep" instead of "rotate"'),
    Mutant(
        "projected-update-times-zero", "subspax/_matrix_loop.py",
        "  return layout.from_matrices(stack, g.dtype), new_state",
        "  return layout.from_matrices(0 * stack, g.dtype), new_state",
        (MATH, "-k", "only_projected"),
        "every projected update multiplied by 0"),
    Mutant(
        "limiter-not-applied", "subspax/_recovery.py",
        "  return factor * phi, last_norm",
        "  return phi, last_norm",
        (MATH, "-k", "recovery_update"),
        "norm-growth limiter computed and stored but not applied"),
    Mutant(
        "recovery-term-removed", "subspax/_outputs.py",
        "stack = matrix.write_update(direction, phi, residual_of=reduced)",
        "stack = matrix.write_update(direction)",
        (MATH, "-k", "recovery_update"),
        "the recovery term left out of the update"),
    # The core.
    Mutant(
        "adam-mu-not-bias-corrected", "subspax/_reduced_adam.py",
        "mu_hat = mu / _bias_correction(config.b1, steps)", "mu_hat = mu",
        (MATH, "-k", "recovery_update"),
        "Adam's first-moment bias correction dropped"),
    Mutant(
        "rotate-c-transposed", "subspax/_transitions.py",
        "new_mu = c @ mu32", "new_mu = c.T @ mu32",
        (MATH, "-k", "rotates"),
        "moments rotated by C^T = S_old^T S_new instead of C"),
    Mutant(
        "rotate-against-new-basis", "subspax/_transitions.py",
        "_transition(config.moments, old, new,",
        "_transition(config.moments, new, new,",
        (MATH, "-k", "rotates"),
        "rotation against the new basis (C = I: the moments never move)"),
    Mutant(
        "reset-keeps-age", "subspax/_transitions.py",
        "return zeros(mu), zeros(nu), zeros(age)",
        "return zeros(mu), zeros(nu), age",
        (MATH, "-k", "reset_restarts"),
        "moments reset without restarting their bias correction"),
    Mutant(
        "refresh-every-step", "subspax/_matrix_loop.py",
        "refreshing = count % config.update_interval == 0",
        "refreshing = count >= 0",
        (MATH, "-k", "only_at_refresh"),
        "the subspace refreshed at every step instead of every T steps"),
    Mutant(
        "trainer-refreshes-every-step", "train/train.py",
        "return (step - 1) % update_interval == 0",
        "return True",
        ("tests/test_train.py", "-k", "ordinary_and_refresh_programs"),
        "the trainer runs the refresh step's program at every step"),
    Mutant(
        "recovery-residual-leaks-alpha", "subspax/_blocks.py",
        "return g - self._back(reduced, start)",
        "return g - 0.25 * self._back(reduced, start)",
        (MATH, "-k", "recovery_update"),
        "the reference code's residual G - alpha S S^T G"),
    # One per policy.
    Mutant(
        "galore-bottom-singular-vectors", "subspax/_linalg.py",
        "return u[:, :r]", "return u[:, -r:]",
        (PROPS, "-k", "galore_matches"),
        "GaLore takes the last r singular vectors"),
    Mutant(
        "subtrack-ascent", "subspax/_policies.py",
        "return -2.0 * (g @ a.T - s @ (a @ a.T))",
        "return 2.0 * (g @ a.T - s @ (a @ a.T))",
        (MATH, "-k", "projection_error"),
        "SubTrack++'s tangent with the wrong sign (ascent, fixed-angle rules)"),
    Mutant(
        "grasswalk-tangent-not-horizontal", "subspax/_policies.py",
        "return z - s @ (s.T @ z)", "return z",
        (MATH, "-k", "turns_one_direction"),
        "GrassWalk's random tangent not projected off span(S)"),
    Mutant(
        "grassjump-same-subspace", "subspax/_policies.py",
        "return self.sample(key, g.shape[0], r)",
        "return self.sample(jax.random.key(0), g.shape[0], r)",
        (MATH, "-k", "rotates and grassjump"),
        "GrassJump ignores the refresh key: it never jumps"),
    Mutant(
        "rso-keeps-moments", "subspax/_methods.py",
        'scale=scale, moments="reset", recovery=False,',
        'scale=scale, moments="keep", recovery=False,',
        (MATH, "-k", "reset_restarts and rso"),
        'RSO with moments="keep" instead of "reset"'),
    Mutant(
        "grass-squared-row-norms", "subspax/_policies.py",
        "norms = jnp.linalg.norm(g, axis=1)",
        "norms = jnp.sum(jnp.square(g), axis=1)",
        (MATH, "-k", "multinomial_scales"),
        "GRASS samples rows by squared norms (not the variance-optimal q)"),
    Mutant(
        "grass-row-scale-dropped", "subspax/_bases.py",
        "self.scale[:, None] != 0, self.scale[:, None] * rows, 0.0)",
        "self.scale[:, None] != 0, rows, 0.0)",
        (PROPS, "-k", "grass_multinomial_with_replacement_is_unbiased"),
        "GRASS's unbiasing row scales left out of the projection"),
    Mutant(
        "apollo-limiter-not-applied", "subspax/_outputs.py",
        "return config.scale * factor * s, last_norm",
        "return config.scale * s, last_norm",
        ("tests/test_apollo_fira.py", "-k", "limiter"),
        "APOLLO's norm-growth limiter computed but not applied"),
    # dtypes and wrappers (optax's rules).
    Mutant(
        "bias-correction-float64-under-x64", "subspax/_reduced_adam.py",
        "return (1 - decay**steps).astype(jnp.float32)",
        "return 1 - decay**steps",
        (TABLE, "-k", "x64"),
        "Adam's bias correction in float64 under jax_enable_x64 (the "
        "row-block loops' float32 carries become float64)"),
    Mutant(
        "prox-state-by-value", "subspax/_core_config.py",
        "return self.prox is not None",
        "return self.prox is not None and not _policies._is_zero(self.prox)",
        (TABLE, "-k", "keeps_the_state_fields and rso"),
        "RSO's displacement exists or not by prox's value, which "
        "inject_hyperparams traces"),
    # Stochastic rounding's random bits.
    Mutant(
        "rounding-layers-share-key", "subspax/_rounding.py",
        "keys = jax.vmap(lambda l: jax.random.fold_in(k, l))(",
        "keys = jax.vmap(lambda l: jax.random.fold_in(k, 0 * l))(",
        (ROUNDING, "-k", "uncorrelated"),
        "every layer of a stack rounds with the same random bits"),
    Mutant(
        "rounding-index-ignores-row-length", "subspax/_rounding.py",
        "stride = stride * shape[axis] % 2**32",
        "stride = stride % 2**32",
        (ROUNDING, "-k", "uncorrelated"),
        "element (i, j) hashes i + j: anti-diagonals share their bits"),
    Mutant(
        "rounding-bits-unmixed", "subspax/_rounding.py",
        "return _fmix32(_fmix32(index * np.uint32(0x9E3779B9) + seed[0]) ^ "
        "seed[1])",
        "return (index * np.uint32(0x9E3779B9) + seed[0]) ^ seed[1]",
        (ROUNDING, "-k", "uncorrelated or variance"),
        "the random bits are a Weyl sequence of the index, not a hash"),
    # The trainer's options.
    Mutant(
        "decay-mask-inverted", "train/optimizers.py",
        "lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)",
        "lambda params: jax.tree.map(lambda p: p.ndim < 2, params)",
        (OPTIONS, "-k", "weight_decay and adamw"),
        "opt.decay_matrices_only decays the norms and spares the kernels"),
    Mutant(
        "block-lr-scale-ignored", "train/optimizers.py",
        "  if scale == 1:\n    return optax.adamw(",
        "  if True:\n    return optax.adamw(",
        (OPTIONS, "-k", "block_lr_scale"),
        "opt.block_lr_scale is accepted and ignored"),
    Mutant(
        "block-lr-scale-every-leaf", "train/optimizers.py",
        "lambda path, u: u * scale if blocks(path, u) else u, updates)",
        "lambda path, u: u * scale, updates)",
        (OPTIONS, "-k", "block_lr_scale"),
        "opt.block_lr_scale scales the embedding and norms too"),
    Mutant(
        "schedule-horizon-after-warmup", "train/optimizers.py",
        "decay_steps=steps, end_value=peak * opt_cfg.min_lr_ratio)",
        "decay_steps=steps - warmup_steps(opt_cfg, steps),\n"
        "      end_value=peak * opt_cfg.min_lr_ratio)",
        (OPTIONS, "-k", "schedule"),
        "the cosine reaches its end warmup steps before the run does"),
    Mutant(
        "trainer-eps-ignored", "train/optimizers.py",
        "adam = dict(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, "
        "mu_dtype=mu_dtype)",
        "adam = dict(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=1e-8, mu_dtype=mu_dtype)",
        (OPTIONS, "-k", "adam_b1 and (adamw or grass)"),
        "opt.eps never reaches Adam"),
    Mutant(
        "method-option-ignored", "train/optimizers.py",
        "return {key: section.get(key, option.default)",
        "return {key: option.default",
        (OPTIONS, "-k", "method_option"),
        "the options of opt.<name> are replaced by the method's defaults"),
    Mutant(
        "rope-theta-ignored", "train/model.py",
        "freq_H2 = theta ** (", "freq_H2 = 10_000.0 ** (",
        (OPTIONS, "-k", "rotary or rope"),
        "model.rope_theta ignored: RoPE always uses base 10000"),
    Mutant(
        "norm-eps-ignored", "train/model.py",
        "cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32,",
        "cfg.d_model, epsilon=1e-6, dtype=jnp.float32,",
        (OPTIONS, "-k", "rms_norm or rope"),
        "model.norm_eps ignored"),
    # The layout: side and stacked leaves.
    Mutant(
        "side-projects-larger", "subspax/_layout.py",
        'side = "left" if m <= n else "right"',
        'side = "left" if m >= n else "right"',
        (MATH, "-k", "rotates and right and grassjump"),
        "side auto projects the larger dimension"),
    Mutant(
        "stack-shares-keys", "subspax/_keys.py",
        "return jax.vmap(lambda i: jax.random.fold_in(key, i))(",
        "return jax.vmap(lambda i: jax.random.fold_in(key, 0 * i))(",
        (MATH, "-k", "stacked"),
        "every matrix of a stack gets the same key (the same random subspace)"),
    # The layer modes.
    Mutant(
        "layer-row-scale-dropped-right", "subspax/reparam.py",
        "d_delta = _contract(_bases.RowBasis(index, scale).coords(dy), saved)",
        "d_delta = _contract(_bases.RowBasis(index, jnp.ones_like(scale))"
        ".coords(dy), saved)",
        (MATH, "-k", "layer_mode"),
        "GRASS layer's delta gradient without the row scales (side right)"),
    Mutant(
        "layer-dense-delta-halved", "subspax/reparam.py",
        "return y + basis.coords(x) @ delta",
        "return y + basis.coords(x) @ (0.5 * delta)",
        (MATH, "-k", "layer_mode"),
        "RSO layer applies half its delta (side left)"),
    Mutant(
        "mode-merge-keeps-delta", "subspax/reparam.py",
        "delta=jnp.zeros_like(layer.delta))",
        "delta=layer.delta)",
        (REPARAM, "-k", "merge_layers"),
        "the refresh merges the delta into W but does not zero it"),
    Mutant(
        "layer-keys-out-of-order", "subspax/reparam.py",
        "_keys.parameter_key(key, index)",
        "_keys.parameter_key(key, len(flat) - 1 - index)",
        (REPARAM, "-k", "refresh_bases_are"),
        "the layers' keys do not follow the parameters' flatten order"),
    Mutant(
        "mode-moments-not-reset", "train/reparam.py",
        "opt_state=subspax.reparam.reset_moments(state.opt_state))",
        "opt_state=state.opt_state)",
        (REPARAM, "-k", "mode_reproduces and grass and False"),
        "the refresh keeps the deltas' Adam moments"),
]


@dataclasses.dataclass
class Result:
  mutant: Mutant
  status: str  # "killed", "survived", "stale", "timeout"
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
  if code is None:  # not a kill: the tests did not finish
    return Result(mutant, "timeout", f"no verdict after {timeout:.0f} s",
                  seconds)
  if code < 0:  # pytest itself was killed: no verdict
    return Result(mutant, "timeout", f"pytest killed by signal {-code}",
                  seconds)
  failed = _FAILED.findall(output)
  detail = failed[0] if failed else f"pytest exit {code} (collection error)"
  return Result(mutant, "killed", detail, seconds)


def baseline(mutants: list[Mutant], src: str, timeout: float) -> list[str]:
  """Runs every distinct test selection on an unmutated copy of ``src``.

  Returns:
    The selections that fail without any mutation (a mutant "killed" by one
    of those proves nothing).
  """
  failing = []
  with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as root:
    _copy_repo(src, root)
    for tests in dict.fromkeys(m.tests for m in mutants):
      code, output = _run_tests(root, tests, timeout)
      if code != 0:
        failing.append(f"{' '.join(tests)}: pytest exit {code}\n"
                       f"{output[-2000:]}")
  return failing


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
  parser.add_argument("--timeout", type=float, default=1800,
                      help="seconds per mutant before it is reported as "
                           "'timeout' (no verdict)")
  parser.add_argument("--stale-only", action="store_true",
                      help="only check that every mutant's old text matches "
                           "exactly once (no tests run)")
  parser.add_argument("--baseline", action="store_true",
                      help="first run each test selection without a mutation "
                           "and stop if one fails")
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
  if args.stale_only:
    stale = 0
    for m in mutants:
      with tempfile.TemporaryDirectory(prefix="mutant-") as root:
        _copy_repo(src, root)
        why = _apply(m, root)
      stale += why is not None
      print(f"{m.name}: {'stale (' + why + ')' if why else 'applies'}")
    return 1 if stale else 0
  if args.baseline:
    failing = baseline(mutants, src, args.timeout)
    if failing:
      print("Tests fail without any mutation:\n" + "\n".join(failing))
      return 2
    print(f"baseline: every selection passes ({time.time() - start:.0f} s)",
          file=sys.stderr, flush=True)
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
            for s in ("killed", "survived", "stale", "timeout")}
  print(f"\n{counts['killed']} killed, {counts['survived']} survived, "
        f"{counts['stale']} stale, {counts['timeout']} timed out, of "
        f"{len(results)} mutants in "
        f"{time.time() - start:.0f} s (src {src}, jobs {args.jobs})")
  return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())

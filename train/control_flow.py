"""Control flow of a compiled program: conditionals executed, loop trip counts.

On a GPU every executed `conditional` is a host synchronisation: XLA's GPU
runtime copies the predicate (or branch index) to the host and waits for it
before it can launch the chosen branch. A CPU run does not show this, so the
dry run reads it from the compiled program instead: `count(compiled)` walks
the optimized HLO from its entry computation, multiplies what a `while` body
executes by the loop's trip count, and counts each `conditional` once per
execution plus what its most expensive branch executes (an upper bound when
the branches differ).
"""

import json
import re
from typing import Any

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_NAME = r"%([\w.\-]+)"
_CALLED = re.compile(r"(?:calls|to_apply|condition|body|true_computation|"
                     r"false_computation)=" + _NAME)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """The instructions of each computation, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.startswith("  "):
      comps[current].append(line)
    elif line.startswith("}"):
      current = None
  return comps, entry


def count(hlo: str) -> dict[str, Any]:
  """Conditionals executed by one run of a compiled program, and its loops.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> def f(x, c):
    ...   step = lambda x, _: (jax.lax.cond(c > 0, jnp.sin, jnp.cos, x), None)
    ...   return jax.lax.scan(step, x, None, length=5)[0]
    >>> args = jnp.ones(4), jnp.int32(1)
    >>> stats = count(jax.jit(f).lower(*args).compile().as_text())
    >>> stats["conditionals"], stats["while_trip_counts"]
    (5, [5])

  Args:
    hlo: The optimized HLO text, `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    `conditionals`: how many conditionals one run executes (a branch's own
    conditionals counted for the branch that executes the most);
    `while_trip_counts`: each `while` loop's trip count (None when XLA does
    not know it), in program order, once per loop instruction;
    `unknown_trip_counts`: True if some loop's trip count is unknown (its
    body is then counted once).
  """
  comps, entry = _computations(hlo)
  memo: dict[str, int] = {}
  trips: list[int | None] = []

  def executed(name: str) -> int:
    if name in memo:
      return memo[name]
    memo[name] = 0  # no recursion in HLO; guards a malformed module
    total = 0
    for line in comps.get(name, ()):
      branches = _BRANCHES.search(line)
      if " conditional(" in line:
        names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")]
                 if branches else _CALLED.findall(line))
        total += 1 + max((executed(b) for b in names), default=0)
      elif " while(" in line:
        trip = _TRIP.search(line)
        n = int(trip.group(1)) if trip else None
        trips.append(n)
        total += (n or 1) * sum(executed(c) for c in _CALLED.findall(line))
      else:
        total += sum(executed(c) for c in _CALLED.findall(line))
    memo[name] = total
    return total

  conditionals = executed(entry) if entry else 0
  return {"conditionals": conditionals, "while_trip_counts": trips,
          "unknown_trip_counts": any(t is None for t in trips)}


def of_compiled(compiled: Any) -> dict[str, Any]:
  """`count` of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  return count(compiled.as_text())


def summary(stats: dict[str, Any]) -> str:
  """One line: the conditionals per run and the loops' trip counts."""
  trips = json.dumps(stats["while_trip_counts"])
  return (f"{stats['conditionals']} conditionals executed per step "
          f"(host synchronisations on a GPU); while-loop trip counts {trips}")

"""The memory of a compiled program, with one definition of its peak.

XLA's `compiled.memory_analysis()` gives four sizes per device: the program's
arguments, its temporaries (`temp`), its outputs and the part of the outputs
written into donated argument buffers (`alias`). The arguments stay live for
the whole program, the temporaries are its scratch, and only the outputs that
are not aliased need new memory, so

  peak = argument + temp + output - alias.

The trainer's memory report, its dry run (`train/dry_run.py`) and the
benchmarks (`bench/`) all use `compiled_memory` below, so their peaks agree.
"""

from typing import Any

SIZES = ("argument", "temp", "output", "alias")


def compiled_memory(compiled: Any) -> dict[str, int]:
  """A compiled program's memory in bytes per device, with its peak.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.ShapeDtypeStruct((256,), jnp.float32)
    >>> mem = compiled_memory(jax.jit(lambda a: a * 2).lower(x).compile())
    >>> mem["peak"] == mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
    True

  Args:
    compiled: The result of `jax.jit(f).lower(...).compile()`.

  Returns:
    {'argument', 'temp', 'output', 'alias', 'peak'}: bytes per device.
  """
  analysis = compiled.memory_analysis()
  mem = {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in SIZES}
  mem["peak"] = mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
  return mem


def mib(n: float) -> str:
  """Bytes as a MiB string with two decimals."""
  return f"{n / 2**20:,.2f} MiB"


def program_line(name: str, mem: dict[str, int]) -> str:
  """One line: a compiled program's sizes and its peak (also in bytes)."""
  return (f"{name} memory, compiler estimate (per device): arguments "
          f"{mib(mem['argument'])}, temporaries {mib(mem['temp'])}, outputs "
          f"{mib(mem['output'])}, aliased (donated) {mib(mem['alias'])}; peak "
          f"{mib(mem['peak'])} ({mem['peak']:,} bytes)")


def report(mem: dict[str, int], state_bytes: int, param_bytes: int,
           refresh: dict[str, int] | None = None) -> str:
  """The memory report the trainer and its dry run print.

  Examples:
    >>> mem = {"argument": 2**20, "temp": 0, "output": 2**20, "alias": 2**20,
    ...        "peak": 2**20}
    >>> print(report(mem, 8, 4).splitlines()[-1])
    exact (global): params 0.00 MiB, optimizer state 0.00 MiB (8 bytes)

  Args:
    mem: `compiled_memory` of the train step.
    state_bytes: Exact bytes of the optimizer state.
    param_bytes: Exact bytes of the parameters.
    refresh: `compiled_memory` of the refresh program of the reparametrised
      layer modes (train/reparam.py), if there is one.

  Returns:
    Two lines (three with a refresh program).
  """
  lines = [program_line("train step", mem)]
  if refresh is not None:
    lines.append(program_line("refresh", refresh))
  lines.append(f"exact (global): params {mib(param_bytes)}, optimizer state "
               f"{mib(state_bytes)} ({state_bytes:,} bytes)")
  return "\n".join(lines)

"""Ordering guarantees that XLA's scheduler would otherwise not give.

subspax overwrites gradients and stacked optimizer states in place, one matrix
(or one layer) at a time. That saves memory only if XLA runs the reads and
writes in the intended order: otherwise it keeps a copy of a whole stack to
preserve old values, or starts every matrix's work at once and keeps all of
its workspace alive. Three guarantees, each named by what it promises:

* :func:`read_first`: *read before the in-place write*. The values of a tree
  (slices of a stack, usually) are read into buffers of their own before
  anything writes into the stack they came from.
* :func:`run_after`: *run after*. A value that XLA can compute only once some
  other values exist, so the work that consumes it starts after them.
* :func:`allocate_late`: *allocate late*. A float32 zero that exists only
  after a given value, to start an accumulator's buffer when it is needed.

How each is enforced depends on the compiler, and is chosen when the program
is lowered (``jax.lax.platform_dependent``), so one traced function serves
both:

* :func:`read_first` is needed by XLA's CPU compiler only. That pipeline
  removes ``optimization_barrier`` before scheduling, so the tree passes
  through a conditional on a predicate XLA cannot fold (a conditional is
  never fused). XLA's GPU compiler already orders these reads before the
  writes (measured: the same temporaries with or without), and there a
  conditional would cost a host synchronisation per execution (the GPU
  runtime copies the predicate to the host), so on a GPU it is a plain read.
* :func:`run_after` and :func:`allocate_late` select on a predicate that is
  never true but that XLA cannot prove false; a select costs nothing and
  needs no synchronisation on any compiler.

:func:`disabled` turns guarantees off while a function is traced, to measure
what each one saves (tests/test_ordering.py does, on both compilers).

Examples:
  >>> import jax.numpy as jnp
  >>> from subspax import ordering
  >>> stack, count = jnp.ones((3, 4)), jnp.int32(5)
  >>> row = ordering.read_first(stack, count, lambda s: s[0])
  >>> count = ordering.run_after(count, row, count)  # the next step waits for it
  >>> int(count), ordering.allocate_late(count).dtype
  (5, dtype('float32'))
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

READ_FIRST = "read_first"
RUN_AFTER = "run_after"
ALLOCATE_LATE = "allocate_late"
GUARANTEES = (READ_FIRST, RUN_AFTER, ALLOCATE_LATE)
_off: set[str] = set()


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
  """Turns the named guarantees off for what is traced inside the block.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> with disabled(READ_FIRST):
    ...   jax.make_jaxpr(lambda x, t: read_first(x, t))(1.0, 0)  # no cond
    { lambda ; a:f32[] b:i32[]. let  in (a,) }

  Args:
    *names: Guarantees of ``GUARANTEES``.

  Yields:
    Nothing; the guarantees are back on after the block.
  """
  unknown = set(names) - set(GUARANTEES)
  if unknown:
    raise ValueError(f"unknown ordering guarantees {sorted(unknown)}; "
                     f"known: {', '.join(GUARANTEES)}")
  before = set(_off)
  _off.update(names)
  try:
    yield
  finally:
    _off.clear()
    _off.update(before)


def _first_element(x: jax.Array) -> jax.Array:
  """``x``'s first element as float32 (with Auto axes under an Explicit mesh)."""
  first = lambda y: y[(0,) * y.ndim].astype(jnp.float32)
  if not jax.sharding.get_abstract_mesh().explicit_axes:
    return first(x)
  scalar = jax.sharding.PartitionSpec()
  return jax.sharding.auto_axes(first, out_sharding=scalar)(x)


def _never(after: Any, token: jax.Array) -> jax.Array:
  """A bool that is never true, computed from ``after``'s values and
  ``token`` (a non-negative number); XLA cannot prove it false."""
  firsts = [_first_element(x) for x in jax.tree.leaves(after) if x.size]
  return jnp.isnan(sum(firsts, jnp.float32(0))) & (token < 0)


def read_first(tree: Any, token: jax.Array,
               read: Callable[[Any], Any] | None = None) -> Any:
  """``read(tree)``, read into buffers of its own before any later use.

  Use it for slices of a stack that is written in place afterwards: unless
  the reads happen first, XLA may fuse a slice into a computation that runs
  after the write and then copy the whole stack to keep the old values.
  ``token`` (a non-negative integer, such as a step count or a layer index)
  also orders the read after whatever computed ``token``. Give ``read`` to
  slice inside the guarantee (then only the slice is ever read: XLA's CPU
  compiler would otherwise convert a whole bfloat16 stack to float32 to
  slice it); without it, ``tree`` itself is read first.

  Examples:
    >>> import jax.numpy as jnp
    >>> stack = jnp.arange(6.0).reshape(3, 2)
    >>> read_first(stack, jnp.int32(1), lambda s: s[1])
    Array([2., 3.], dtype=float32)

  Args:
    tree: A pytree of arrays.
    token: A non-negative integer scalar (never negative at run time).
    read: ``tree -> values`` (default: the identity).

  Returns:
    ``read(tree)``, unchanged in value.
  """
  read = read or (lambda t: t)
  if READ_FIRST in _off:
    return read(tree)

  def through_conditional(tree, token):  # the CPU pipeline drops barriers
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(read, t))
    return jax.lax.cond(token >= 0, read, zeros, tree)

  def plain(tree, token):
    del token
    return read(tree)

  return jax.lax.platform_dependent(tree, token, cpu=through_conditional,
                                    default=plain)


def run_after(tree: Any, after: Any, token: jax.Array) -> Any:
  """``tree``, unchanged, as values XLA can compute only once ``after`` exists.

  Each leaf's first element is rewritten with itself under a select on a
  predicate that is never true (``token < 0`` and a NaN among ``after``'s
  first elements) but that XLA cannot fold: so whatever consumes ``tree``
  starts after ``after`` is computed, and an array leaf keeps its buffer (a
  one-element in-place write).

  Examples:
    >>> import jax.numpy as jnp
    >>> run_after(jnp.int32(7), jnp.ones(3), jnp.int32(0))
    Array(7, dtype=int32)

  Args:
    tree: A pytree of arrays (scalars included) to hold back.
    after: A pytree of arrays that must exist first.
    token: A non-negative scalar (never negative at run time), e.g. a step
      count, a layer index or a norm.

  Returns:
    ``tree``, unchanged in value.
  """
  if RUN_AFTER in _off:
    return tree
  never = _never(after, token)

  def hold(x):
    if not x.size:
      return x
    if not x.ndim:
      return jnp.where(never, jnp.zeros((), x.dtype), x)
    first = (0,) * x.ndim
    return x.at[first].set(jnp.where(never, jnp.zeros((), x.dtype), x[first]))
  return jax.tree.map(hold, tree)


def allocate_late(token: jax.Array) -> jax.Array:
  """A float32 zero that XLA can compute only once ``token`` exists.

  Start an accumulator from it (``zeros + allocate_late(count)``) so that
  its buffer is not allocated, and kept, from the start of the program.

  Examples:
    >>> import jax.numpy as jnp
    >>> allocate_late(jnp.int32(3))
    Array(0., dtype=float32)

  Args:
    token: A non-negative scalar (never negative at run time).

  Returns:
    A float32 scalar 0.
  """
  if ALLOCATE_LATE in _off:
    return jnp.zeros((), jnp.float32)
  return jnp.where(token < 0, jnp.nan, 0.0).astype(jnp.float32)

"""Which parameters are projected, and how each one is viewed as a matrix.

Every projected parameter is viewed as a stack of matrices ``(B, m, n)``, as
stored (no transposes). The math is written for the *canonical* matrix
``(d, D)``, ``d`` the projected ("small") side and ``D`` the kept side; for a
weight ``W`` of shape ``(m, n)`` (Flax kernel convention, ``y = x @ W``):

* side ``"left"`` (``m <= n`` under ``"auto"``): canonical ``G`` is ``W``'s
  gradient itself, the basis ``S`` is ``(m, r)`` and the reduced gradient is
  ``S^T G`` of shape ``(r, n)``;
* side ``"right"`` (``m > n``): canonical ``G`` is the transpose, so the basis
  is ``(n, r)`` and the reduced gradient ``(r, m)`` is the transpose of the
  paper's ``G S``.

All other axes of the parameter (for example the layer axis of a scanned
``(L, m, n)`` stack) are batch axes: each matrix gets its own subspace.

The side is decided once from the parameter's shape (docs/algorithms.md
section 1)
and recorded in a static :class:`MatrixLayout`; it is never inferred from the
shape of a reduced tensor.
"""

from __future__ import annotations

import fnmatch
import math
import re
import typing
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from subspax import _types

Axes = Union[int, Sequence[int]]

SIDES = typing.get_args(_types.Side)

# Default routing: project a matrix only when it is at most this elongated.
MAX_ASPECT_RATIO = 8


class MatrixSpec(NamedTuple):
  """Which axes of a parameter form the rows and the columns of its matrix.

  Axes that are in neither are batch axes: the matrix is repeated over them
  (for example the layer axis of scanned weights) and each repetition gets its
  own subspace and optimizer state.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> # An attention output kernel (heads, head_dim, d_model): the matrix is
    >>> # (heads * head_dim) x d_model.
    >>> spec = subspax.MatrixSpec(rows=(0, 1), cols=2)
    >>> tx = subspax.scale_by_galore(rank=4, projected={'out': spec})
    >>> grads = {'out': jnp.ones((4, 8, 16))}
    >>> updates, state = tx.update(grads, tx.init(grads))

  Attributes:
    rows: Axis or axes forming the input (row) dimension ``m``.
    cols: Axis or axes forming the output (column) dimension ``n``.
  """

  rows: Axes = -2
  cols: Axes = -1


class MatrixLayout(NamedTuple):
  """Static description of one projected parameter (hashable, no arrays).

  The core builds one per projected parameter from its shape, its
  :class:`MatrixSpec`, the rank and the side, and keeps it as static metadata
  of the parameter's state, so the side is never guessed from the shape of a
  reduced tensor.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> layout = subspax.MatrixLayout(
    ...     shape=(3, 8, 16), batch_axes=(0,), row_axes=(1,), col_axes=(2,),
    ...     side='left', rank=2)  # three layers of 8 x 16 kernels
    >>> layout.num_matrices, layout.d, layout.D
    (3, 8, 16)
    >>> layout.to_matrices(jnp.ones((3, 8, 16))).shape
    (3, 8, 16)

  Attributes:
    shape: The parameter's shape.
    batch_axes: Axes repeated over (each index is its own matrix).
    row_axes: Axes forming the rows ``m`` (input dimension).
    col_axes: Axes forming the columns ``n`` (output dimension).
    side: ``"left"`` (project the rows, basis ``m x r``) or ``"right"``.
    rank: The subspace rank ``r``.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]
  side: str
  rank: int

  @property
  def perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.row_axes + self.col_axes

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def m(self) -> int:
    return math.prod(self.shape[a] for a in self.row_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.col_axes)

  @property
  def d(self) -> int:
    """The projected (reduced) dimension."""
    return self.m if self.side == "left" else self.n

  @property
  def D(self) -> int:  # pylint: disable=invalid-name
    """The kept dimension."""
    return self.n if self.side == "left" else self.m

  def to_matrices(self, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Views a parameter-shaped array as a ``(B, m, n)`` stack of ``dtype``.

    A view (no copy) when the batch, row and column axes are already in that
    order, as for ``(L, m, n)`` scanned kernels, and ``dtype`` is ``x``'s.
    """
    x = jnp.transpose(x, self.perm).reshape(self.num_matrices, self.m, self.n)
    return x.astype(dtype)

  def from_matrices(self, x: jax.Array, dtype) -> jax.Array:
    """Inverse of :meth:`to_matrices`, cast to ``dtype``."""
    x = x.reshape(tuple(self.shape[a] for a in self.perm))
    return jnp.transpose(x, _inverse(self.perm)).astype(dtype)

  def batched(self, *trailing: int) -> tuple[int, ...]:
    """Shape ``batch_shape + trailing``."""
    return self.batch_shape + tuple(trailing)

  def reduced_specs(self, spec: PartitionSpec) -> tuple[Any, Any, Any]:
    """Mesh axes of the batch axes, the ``d`` axis and the ``D`` axis.

    Args:
      spec: The parameter's PartitionSpec.

    Returns:
      ``(batch_entries, d_entry, D_entry)``: a tuple of spec entries for the
      batch axes, and the entries for the projected and the kept dimension.
      A dimension merged from several axes keeps a sharding only when it sits
      on the outermost of them (a reshape preserves exactly that).
    """
    entries = tuple(spec) + (None,) * (len(self.shape) - len(spec))
    batch = tuple(entries[a] for a in self.batch_axes)
    rows = _merged(entries, self.row_axes)
    cols = _merged(entries, self.col_axes)
    return (batch, rows, cols) if self.side == "left" else (batch, cols, rows)


def _merged(entries, axes):
  """The spec entry of a dimension merged from ``axes`` (outermost only)."""
  if not axes or any(entries[a] is not None for a in axes[1:]):
    return None
  return entries[axes[0]]


def _inverse(perm):
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def _normalize_axes(axes: Axes, ndim: int, what: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes:
    raise ValueError(f"MatrixSpec.{what} must name at least one axis.")
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"MatrixSpec.{what} axis {a} is out of range for a parameter with "
          f"{ndim} dimensions.")
    out.append(a % ndim)
  return tuple(out)


def make_layout(shape: Sequence[int], spec: MatrixSpec, rank: int,
                side: str) -> MatrixLayout:
  """Builds the static layout of one projected parameter.

  Args:
    shape: The parameter's shape (at least 2-D).
    spec: Which axes are rows and columns.
    rank: Requested rank; the layout's rank is ``min(rank, d)``.
    side: ``"auto"``, ``"left"`` or ``"right"``.

  Returns:
    The :class:`MatrixLayout`.
  """
  shape = tuple(int(s) for s in shape)
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"only parameters with at least 2 dimensions can be projected, got "
        f"shape {shape}; leave it out of `projected`.")
  rows = _normalize_axes(spec.rows, ndim, "rows")
  cols = _normalize_axes(spec.cols, ndim, "cols")
  if set(rows) & set(cols):
    raise ValueError(f"MatrixSpec rows {rows} and cols {cols} overlap.")
  batch = tuple(a for a in range(ndim) if a not in rows + cols)
  m = math.prod(shape[a] for a in rows)
  n = math.prod(shape[a] for a in cols)
  if side == "auto":
    side = "left" if m <= n else "right"
  d = m if side == "left" else n
  return MatrixLayout(shape=shape, batch_axes=batch, row_axes=rows,
                      col_axes=cols, side=side, rank=min(rank, d))


Projected = Union[None, bool, MatrixSpec, Any, Callable[..., Any]]


def default_is_projected(shape: Sequence[int], rank: int) -> bool:
  """The default routing rule (docs/algorithms.md section 1).

  A parameter is projected when it has at least two dimensions, ``rank`` is
  smaller than both matrix dimensions (else projection saves nothing) and the
  matrix is at most 8 times longer than wide (which leaves embeddings and
  language-model heads to plain Adam).

  Examples:
    >>> import subspax
    >>> subspax.default_is_projected((512, 512), rank=128)
    True
    >>> subspax.default_is_projected((32000, 512), rank=128)  # an embedding
    False

  Args:
    shape: The parameter's shape; the last two axes form the matrix.
    rank: The requested rank.

  Returns:
    Whether the default rule projects it.
  """
  if len(shape) < 2:
    return False
  m, n = shape[-2], shape[-1]
  return rank < min(m, n) and max(m, n) <= MAX_ASPECT_RATIO * min(m, n)


def make_router(projected: Projected, rank: int
                ) -> Callable[[Any, Any], Optional[MatrixSpec]]:
  """Turns the user's ``projected`` argument into ``(path, param) -> spec``.

  Args:
    projected: ``None`` for the default rule; a bool or :class:`MatrixSpec`
      applied to every parameter with at least 2 dimensions; a pytree (prefix)
      of such leaves (``None``/``False`` = plain Adam); or a callable
      ``(path, param) -> bool | MatrixSpec | None``.
    rank: The requested rank (used by the default rule).

  Returns:
    A function giving the :class:`MatrixSpec` of a projected parameter, or
    ``None`` for one that gets plain Adam. Complex parameters are never
    projected by default; projecting one explicitly raises a ``ValueError``
    (the reduced-space math is real: it would drop the imaginary part).
    A ``UserWarning`` names each parameter where ``rank`` saves nothing: a
    projected matrix with ``rank`` not smaller than its smaller side (its
    state would be larger than Adam's), or a matrix the default rule leaves
    to plain Adam only because of its rank.
  """
  route = _make_real_router(projected, rank)
  warned = set()  # parameters already warned about (the router runs per trace)

  def checked(path, p):
    spec = route(path, p)
    name = jax.tree_util.keystr(path) or "<root>"
    if spec is not None and _is_complex(p):
      raise ValueError(
          f"projected: parameter {name} is "
          f"complex ({_dtype(p)}) and subspace projection is real "
          "only; leave it out of `projected` (complex parameters then get "
          "plain Adam, as by default).")
    message = _rank_message(name, p, spec, rank, default=projected is None)
    if message and name not in warned:
      warned.add(name)
      warnings.warn(message, UserWarning, stacklevel=2)
    return spec

  return checked


def _rank_message(name: str, p: Any, spec: Optional[MatrixSpec], rank: int,
                  default: bool) -> Optional[str]:
  """Why ``rank`` saves nothing on parameter ``name``, or None when it does.

  A projected matrix whose rank is not smaller than its smaller side keeps
  more state than Adam's (the rank is cut to the projected side, and the basis
  comes on top of full-size moments). The default rule leaves such a matrix to
  plain Adam, which is as silent a surprise when the rank was meant for it;
  matrices it leaves out for their shape (embeddings, heads) are not reported.
  """
  shape = tuple(jnp.shape(p))
  if spec is None:
    if not default or len(shape) < 2 or _is_complex(p):
      return None
    m, n = shape[-2], shape[-1]
    if rank < min(m, n) or max(m, n) > MAX_ASPECT_RATIO * min(m, n):
      return None
    return (f"rank {rank} is not smaller than the smaller side of parameter "
            f"{name} ({m} x {n}), so it gets plain Adam and no subspace; "
            f"pass a rank below {min(m, n)} to project it.")
  if len(shape) < 2:
    return None  # make_layout raises its own error
  try:
    rows = _normalize_axes(spec.rows, len(shape), "rows")
    cols = _normalize_axes(spec.cols, len(shape), "cols")
  except ValueError:
    return None  # make_layout raises its own error
  m = math.prod(shape[a] for a in rows)
  n = math.prod(shape[a] for a in cols)
  if rank < min(m, n):
    return None
  return (f"rank {rank} is not smaller than the smaller side of projected "
          f"parameter {name} ({m} x {n}), so its optimizer state is larger "
          f"than Adam's; pass a rank below {min(m, n)}, or leave it out of "
          "`projected` to give it plain Adam.")


def _dtype(p):
  return p.dtype if hasattr(p, "dtype") else jnp.result_type(p)


def _is_complex(p) -> bool:
  return jnp.issubdtype(_dtype(p), jnp.complexfloating)


def _make_real_router(projected: Projected, rank: int):
  """:func:`make_router` without the complex check."""

  def from_value(value, param):
    if value is None or value is False:
      return None
    if value is True:
      return MatrixSpec()
    if isinstance(value, MatrixSpec):
      return value
    raise TypeError(
        "`projected` leaves must be bool, MatrixSpec or None, got "
        f"{type(value).__name__}.")

  if projected is None:
    return lambda path, p: (MatrixSpec() if default_is_projected(
        jnp.shape(p), rank) and not _is_complex(p) else None)
  if isinstance(projected, (bool, MatrixSpec)):
    return lambda path, p: (from_value(projected, p)
                            if jnp.ndim(p) >= 2 else None)
  if callable(projected):
    return lambda path, p: from_value(projected(path, p), p)

  def route_from_tree(path, p):
    node = projected
    for key in path:
      if isinstance(node, (bool, MatrixSpec)) or node is None:
        break
      node = _child(node, key)
    return from_value(node, p)

  return route_from_tree


def _child(node, key):
  """Follows one path entry into a pytree node (dict, list, attr)."""
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return jax.tree.leaves(node)[key.key]
  raise TypeError(f"unsupported pytree path entry {key!r} in `projected`.")


def path_name(path: Sequence[Any]) -> str:
  """A pytree path as a dotted name, e.g. ``blocks.attn.q.kernel``.

  Examples:
    >>> import jax, subspax
    >>> path = jax.tree_util.tree_flatten_with_path({'attn': {'q': 0}})[0][0][0]
    >>> subspax.path_name(path)
    'attn.q'

  Args:
    path: A key path from ``jax.tree_util.tree_flatten_with_path`` or the
      ``path`` argument of a ``projected`` callable.

  Returns:
    The keys joined by ``"."`` (list indices as numbers).
  """
  return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


_GLOB_CHARS = frozenset("*?[")


def _name_matcher(pattern: str) -> Callable[[str], bool]:
  """One pattern of :func:`projected_by_name` as a test on dotted names."""
  if pattern.startswith("re:"):
    try:
      regex = re.compile(pattern[3:])
    except re.error as e:
      raise ValueError(
          f"projected_by_name: {pattern!r} is not a valid regular expression "
          f"({e}); fix it or drop the 're:' prefix for a name") from None
    return lambda name: regex.search(name) is not None
  if _GLOB_CHARS & set(pattern):
    return lambda name: fnmatch.fnmatchcase(name, pattern)
  words = pattern.split(".")
  if not all(words):
    raise ValueError(
        f"projected_by_name: {pattern!r} has an empty part; write names such "
        "as 'attn', 'mlp.up' or a glob such as 'blocks.*.kernel'")

  def has_words(name: str) -> bool:
    parts = name.split(".")
    return any(parts[i:i + len(words)] == words
               for i in range(len(parts) - len(words) + 1))

  return has_words


def projected_by_name(patterns: Union[str, Sequence[str]]
                      ) -> Callable[[Any, Any], bool]:
  """Selects the parameters to project by name, like PyTorch's target modules.

  The analogue of Hugging Face's ``optim_target_modules=["attn", "mlp"]`` and
  galore-torch's ``--target_modules``: the result is a ``projected``
  predicate for every subspax method. A parameter's name is its pytree path
  joined by dots (:func:`path_name`), e.g. ``blocks.attn.q.kernel``. Each
  pattern is one of:

  * a name: its dot-separated words appear consecutively among the name's
    (``attn`` matches ``blocks.attn.q.kernel`` but not
    ``blocks.attn_norm.scale``; ``attn.q`` matches only the query kernel);
  * a glob, if it holds ``*``, ``?`` or ``[``: matched against the whole
    name (``blocks.*.kernel``, ``*proj*``);
  * a regular expression after ``re:``, searched in the name
    (``re:(q|v)_proj``).

  A parameter is projected when any pattern matches and it has at least two
  dimensions (norm scales and biases stay with plain Adam even when their
  module matches). Unlike the default rule no shape test is applied: name an
  embedding and it is projected. A stack of per-layer vectors (the ``(L, D)``
  norm scales of a scanned model) has two dimensions: name the kernels
  (``attn,mlp``, ``*.kernel``) rather than a whole block.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> params = {'attn': {'q': jnp.ones((8, 8)), 'k': jnp.ones((8, 8))},
    ...           'attn_norm': jnp.ones(8), 'mlp': {'up': jnp.ones((8, 16))},
    ...           'embed': jnp.ones((64, 8))}
    >>> projected = subspax.projected_by_name('attn,mlp')
    >>> tx = subspax.galore(1e-3, rank=2, projected=projected)
    >>> state = tx.init(params)
    >>> import jax
    >>> sorted(subspax.path_name(path) for path, p in
    ...        jax.tree_util.tree_flatten_with_path(params)[0]
    ...        if projected(path, p))
    ['attn.k', 'attn.q', 'mlp.up']
    >>> subspax.projected_by_name(['re:^attn\\\\.(q|v)$'])(
    ...     (jax.tree_util.DictKey('attn'), jax.tree_util.DictKey('q')),
    ...     params['attn']['q'])
    True

  Args:
    patterns: Names, globs or ``re:`` regular expressions; a sequence, or
      one string of comma-separated patterns (``"attn,mlp"``).

  Returns:
    A callable ``(path, param) -> bool`` to pass as ``projected=``.

  Raises:
    TypeError: ``patterns`` is not a string or a sequence of strings.
    ValueError: no pattern is given, a regular expression does not compile,
      or a name has an empty part.
  """
  if isinstance(patterns, str):
    items = patterns.split(",")
  elif isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns):
    items = list(patterns)
  else:
    raise TypeError(
        "projected_by_name: patterns must be a string or a sequence of strings, "
        f"got {patterns!r}")
  items = [p.strip() for p in items if p.strip()]
  if not items:
    raise ValueError(
        f"projected_by_name: no pattern in {patterns!r}; give names such as "
        "'attn,mlp'")
  matchers = [_name_matcher(p) for p in items]

  def projected(path, param) -> bool:
    if jnp.ndim(param) < 2:
      return False
    name = path_name(path)
    return any(match(name) for match in matchers)

  return projected

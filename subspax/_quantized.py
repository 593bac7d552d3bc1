"""Block-wise 8-bit storage of the reduced Adam moments.

An ``(..., r, D)`` array is stored as one 8-bit code per value and one
float32 scale per block of ``BLOCK_SIZE`` consecutive values of a row (along
the last axis, ``D``): the scale is the block's largest magnitude (absmax)
and a code indexes a fixed table of 8-bit levels in ``[-1, 1]`` or
``[0, 1]``. A block never spans two rows, so it never spans two matrices of
a stack either, and the codes and their scales can be sharded together along
``D`` (docs/algorithms.md section 8.1).

Two tables (``mode``):

* ``"linear"``: evenly spaced levels, as absmax int8 quantization.
* ``"quantile"``: the 8-bit quantiles of a distribution of ``|x| / absmax``
  whose density is ``proportional to 1 / (1 + MU * |x|)``: uniform below
  ``1 / MU``, log-uniform above, the spread of Adam moments within a block.
  The levels are dense near zero and equally spaced in relative terms
  (mu-law companding), so a value 1000 times smaller than its block's
  absmax keeps a few percent of relative precision, where the linear table
  would store 0.

Signed values (first moments) take the nearest level. Non-negative values
(second moments, ``signed=False``) are stored as their square root, rounded
*up* to the next level: a positive ``nu`` never decodes to 0, and never to
less than itself (up to float rounding), so Adam's denominator
``sqrt(nu) + eps`` is never underestimated and ``mu / (sqrt(nu) + eps)``
cannot explode. Storing ``sqrt(nu)`` halves the dynamic range in log terms
(the levels reach 16x lower in the linear table) and makes the levels those
of Adam's denominator itself.

References:
  Dettmers et al., 8-bit Optimizers via Block-wise Quantization,
  https://arxiv.org/abs/2110.02861;
  Li et al., Memory Efficient Optimizers with 4-bit States (the zero point
  of the second moment), https://arxiv.org/abs/2309.01507
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

from subspax import _types

BLOCK_SIZE = 256
MODES = typing.get_args(_types.QuantizeMoments)[1:]  # without "off"
# The quantile tables' companding constants: levels are log-spaced above
# 1 / MU (first moments: 127 magnitudes; second moments: 255 square roots).
SIGNED_MU = 2.0**10
UNSIGNED_MU = 2.0**12


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "scales"],
                   meta_fields=["mode", "signed"])
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An array stored block-wise in 8 bits (see :func:`quantize`).

  Attributes:
    codes: One code per value, the array's own shape ``(..., r, D)``: int8
      in ``[-127, 127]`` (``signed``) or uint8 in ``[0, 255]``.
    scales: The absmax of each block of ``BLOCK_SIZE`` values along the last
      axis (of ``sqrt(x)`` when not ``signed``), ``(..., r, ceil(D / 256))``,
      float32.
    mode: Static: ``"linear"`` or ``"quantile"`` levels.
    signed: Static: any sign (nearest level), or non-negative values stored
      as rounded-up square roots.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> q = subspax.quantize(jnp.ones((2, 300)), "quantile")
    >>> q.shape, q.codes.dtype, q.scales.shape
    ((2, 300), dtype('int8'), (2, 2))
  """

  codes: jax.Array
  scales: jax.Array
  mode: str
  signed: bool

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape (that of the codes)."""
    return self.codes.shape


def num_blocks(size: int) -> int:
  """Blocks along a last axis of ``size`` values."""
  return max(1, math.ceil(size / BLOCK_SIZE))


@functools.lru_cache(maxsize=None)
def _levels(mode: str, signed: bool) -> np.ndarray:
  """The magnitudes a code stands for, ascending, from 0 to 1 (float32).

  Signed codes ``c`` in ``[-127, 127]`` stand for ``sign(c) levels[|c|]``;
  unsigned codes ``c`` in ``[0, 255]`` for ``levels[c]``.
  """
  n = 127 if signed else 255
  t = np.arange(n + 1, dtype=np.float64) / n
  if mode == "linear":
    levels = t
  else:
    mu = SIGNED_MU if signed else UNSIGNED_MU
    levels = np.expm1(t * np.log1p(mu)) / mu
  levels[-1] = 1.0
  return levels.astype(np.float32)


def max_gap(mode: str, signed: bool) -> float:
  """The largest distance between two adjacent levels (relative to absmax)."""
  return float(np.max(np.diff(_levels(mode, signed))))


def _block_absmax(x: jax.Array) -> jax.Array:
  """``(..., D)`` -> the absmax of each block, ``(..., ceil(D / 256))``."""
  size = x.shape[-1]
  block = min(size, BLOCK_SIZE)
  n = num_blocks(size)
  pad = n * block - size
  x = jnp.abs(x)
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return jnp.max(x.reshape(x.shape[:-1] + (n, block)), axis=-1)


def _per_value(scales: jax.Array, size: int) -> jax.Array:
  """Each block's scale repeated over its values, ``(..., size)``."""
  block = min(size, BLOCK_SIZE)
  shape = scales.shape + (block,)
  repeated = jnp.broadcast_to(scales[..., None], shape)  # a view, no gather
  return repeated.reshape(shape[:-2] + (-1,))[..., :size]


def _bracket(unit: jax.Array, mode: str, signed: bool) -> jax.Array:
  """The index ``low`` with ``levels[low] <= unit < levels[low + 1]`` (``n - 1``
  at ``unit == 1``), int32.

  The levels are found by inverting their formula and then checking the
  bracket against the table (one step either way absorbs float rounding):
  elementwise work that fuses with its neighbours.
  """
  n = 127 if signed else 255
  levels = jnp.asarray(_levels(mode, signed))
  if mode == "linear":
    guess = jnp.floor(unit * n)
  else:
    c = SIGNED_MU if signed else UNSIGNED_MU
    guess = jnp.floor(jnp.log1p(c * unit) * (n / math.log1p(c)))
  low = jnp.clip(guess.astype(jnp.int32), 0, n - 1)
  low = jnp.clip(low - (unit < levels[low]), 0, n - 1)
  return jnp.clip(low + (unit >= levels[low + 1]), 0, n - 1)


def _index(unit: jax.Array, mode: str, signed: bool,
           uniform: jax.Array | None = None) -> jax.Array:
  """The level index of each ``unit`` value in ``[0, 1]``, int32.

  Signed: the nearest level, or with ``uniform`` (U[0, 1) values) the upper
  of the two bracketing levels with probability ``(unit - lo) / (hi - lo)``
  (unbiased); unsigned: the smallest level ``>= unit``.
  """
  n = 127 if signed else 255
  if mode == "linear" and uniform is None:
    index = jnp.round(unit * n) if signed else jnp.ceil(unit * n)
    return jnp.clip(index, 0, n).astype(jnp.int32)
  levels = jnp.asarray(_levels(mode, signed))
  low = _bracket(unit, mode, signed)
  lo, hi = levels[low], levels[low + 1]
  if not signed:
    return low + (unit > lo)
  if uniform is None:
    return low + (unit > (lo + hi) / 2)
  return low + (uniform * (hi - lo) < unit - lo)


def quantize(x: jax.typing.ArrayLike, mode: _types.QuantizeMoments = "quantile",
             signed: bool = True, *,
             uniform: jax.typing.ArrayLike | None = None) -> QuantizedArray:
  """Stores ``x`` (``(..., D)``, float) block-wise in 8 bits.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> x = jnp.array([[0.5, -1.0, 0.25, 0.0]])
    >>> [round(v, 4) for v in subspax.dequantize(subspax.quantize(x, "linear"))[0].tolist()]
    [0.5039, -1.0, 0.252, 0.0]
    >>> nu = jnp.array([[4.0, 1e-8, 0.0]])  # never decoded below its value
    >>> subspax.dequantize(subspax.quantize(nu, "linear", signed=False)) >= nu
    Array([[ True,  True,  True]], dtype=bool)

  Args:
    x: The values; blocks run along the last axis.
    mode: ``"linear"`` (evenly spaced levels) or ``"quantile"`` (levels dense
      near zero, evenly spaced in relative terms above ``1 / 1024`` of the
      absmax, ``1 / 4096`` for square roots).
    signed: ``True``: any values, each stored as the nearest level (int8
      codes). ``False``: non-negative values (second moments), stored as
      ``sqrt(x)`` rounded up to the next level (uint8 codes), so that a
      positive value never decodes to 0 or below itself.
    uniform: Signed values only: U[0, 1) numbers of ``x``'s shape. Each
      magnitude then rounds to the upper of its two neighbouring levels with
      probability equal to its distance from the lower one (over their
      gap), so that ``E[dequantize(q)] == x`` for the block scales ``x``
      gives (unbiased stochastic rounding). None: the nearest level.
      :func:`subspax.stochastic_quantize` draws them from a key.

  Returns:
    A :class:`QuantizedArray` with ``x``'s shape.

  References:
    Dettmers et al., https://arxiv.org/abs/2110.02861
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if uniform is not None and not signed:
    raise ValueError("uniform (stochastic rounding) needs signed=True; "
                     "unsigned values always round up.")
  x = jnp.asarray(x, jnp.float32)
  if not signed:
    x = jnp.sqrt(jnp.maximum(x, 0.0))
  scales = _block_absmax(x)
  inverse = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0),
                      0.0)
  unit = jnp.minimum(jnp.abs(x) * _per_value(inverse, x.shape[-1]), 1.0)
  index = _index(unit, mode, signed,
                 None if uniform is None else jnp.asarray(uniform, jnp.float32))
  if signed:
    codes = jnp.where(x < 0, -index, index).astype(jnp.int8)
  else:
    codes = index.astype(jnp.uint8)
  return QuantizedArray(codes=codes, scales=scales, mode=mode, signed=signed)


def dequantize(q: QuantizedArray) -> jax.Array:
  """The float32 values a :class:`QuantizedArray` stands for.

  Examples:
    >>> import jax.numpy as jnp, subspax
    >>> x = jnp.linspace(-1.0, 1.0, 512).reshape(2, 256)
    >>> error = subspax.dequantize(subspax.quantize(x, "quantile")) - x
    >>> bool(jnp.max(jnp.abs(error)) < 0.03)
    True

  Args:
    q: Codes and block scales from :func:`quantize`.

  Returns:
    A float32 array of ``q.shape`` (the square of the stored root when not
    ``q.signed``).
  """
  levels = jnp.asarray(_levels(q.mode, q.signed))
  index = q.codes.astype(jnp.int32)
  magnitude = levels[jnp.abs(index)]
  values = jnp.where(index < 0, -magnitude, magnitude)
  values = values * _per_value(q.scales, q.codes.shape[-1])
  return values if q.signed else jnp.square(values)


def zeros(shape: tuple[int, ...], mode: str, signed: bool) -> QuantizedArray:
  """The quantized zeros of ``shape`` (all codes and scales 0)."""
  return QuantizedArray(
      codes=jnp.zeros(shape, jnp.int8 if signed else jnp.uint8),
      scales=jnp.zeros(shape[:-1] + (num_blocks(shape[-1]),), jnp.float32),
      mode=mode, signed=signed)


def load(x) -> jax.Array:
  """A stored moment as float32: dequantized, or a plain array cast."""
  if isinstance(x, QuantizedArray):
    return dequantize(x)
  return x.astype(jnp.float32)


def store(value: jax.Array, like, *, cast: bool = True):
  """``value`` stored like ``like``: quantized the same way, or cast.

  ``cast=False`` leaves a plain ``value`` as it is, for a caller whose
  write-back casts it (the core's Adam step, whose program is then the one
  without quantization).
  """
  if isinstance(like, QuantizedArray):
    return quantize(value, like.mode, like.signed)
  return value.astype(like.dtype) if cast else value


# `by_column_blocks` splits the columns into about this many blocks.
COLUMN_BLOCKS = 8


def by_column_blocks(fn, *arrays):
  """``fn(*arrays)`` for ``fn`` that treats columns independently, in blocks.

  The arrays (``(..., D)``, plain or :class:`QuantizedArray`) are cut into
  blocks of whole 8-bit blocks of columns (a multiple of ``BLOCK_SIZE``), and
  ``fn``'s results, stored like its arguments, are written over them block
  by block in a loop: the float32 workspace of ``fn`` is one block's, where
  it would otherwise be several decoded copies of the whole arrays. Where no
  array is quantized, ``D`` is not a multiple of ``BLOCK_SIZE``, or is one
  block, ``fn`` runs once; and under a mesh of several devices, where ``D``
  is a sharded axis (a device's share is already a part of the columns) and
  a block at a traced offset would make XLA gather the whole arrays.

  Args:
    fn: Maps column blocks of ``arrays`` to as many results of the same
      shapes and storage.
    *arrays: Arrays of one last-axis size ``D``.

  Returns:
    ``fn``'s results over all columns.
  """
  width = arrays[0].shape[-1]
  blocks = width // BLOCK_SIZE
  if (width % BLOCK_SIZE or blocks < 2 or _on_several_devices()
      or not any(isinstance(x, QuantizedArray) for x in arrays)):
    return fn(*arrays)
  count = next(k for k in range(min(COLUMN_BLOCKS, blocks), blocks + 1)
               if blocks % k == 0)
  size = width // count

  def cut(x, start, scale=1):
    return jax.lax.dynamic_slice_in_dim(x, start // scale, size // scale, -1)

  def paste(x, value, start, scale=1):
    return jax.lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype),
                                               start // scale, x.ndim - 1)

  def take(x, start):
    if isinstance(x, QuantizedArray):
      return dataclasses.replace(x, codes=cut(x.codes, start),
                                 scales=cut(x.scales, start, BLOCK_SIZE))
    return cut(x, start)

  def put(x, value, start):
    if isinstance(x, QuantizedArray):
      return dataclasses.replace(
          x, codes=paste(x.codes, value.codes, start),
          scales=paste(x.scales, value.scales, start, BLOCK_SIZE))
    return paste(x, value, start)

  def body(b, carry):
    start = b * size
    results = fn(*(take(x, start) for x in carry))
    return tuple(put(x, v, start) for x, v in zip(carry, results))

  return jax.lax.fori_loop(0, count, body, tuple(arrays))


def _on_several_devices() -> bool:
  """Whether the code is traced under a mesh of more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1

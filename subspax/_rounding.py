"""Unbiased stochastic rounding, and parameter updates that use it.

Rounding a float32 value ``x`` that lies between two neighbours ``lo < x < hi``
of a narrower format up to ``hi`` with probability ``(x - lo) / (hi - lo)``
(down to ``lo`` otherwise) gives ``E[round(x)] = x``: small updates to narrow
(bfloat16) weights then accumulate in expectation instead of being lost, as
they are under round-to-nearest once ``|u| < ulp(p) / 2``. The rule and the
key derivation are docs/algorithms.md section 11.

References:
  Gupta et al., "Deep Learning with Limited Numerical Precision",
  https://arxiv.org/abs/1502.02551;
  Zamirai et al., "Revisiting BFloat16 Training",
  https://arxiv.org/abs/2010.06192
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspax import _quantized

# A bool pytree prefix of the parameters, or (path, leaf) -> bool.
Stacked = Union[None, bool, Any, Callable[[tuple, Any], bool]]


def _is_empty(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _is_leaf(x: Any) -> bool:
  """A parameter: a quantized one is one leaf, not its codes and scales."""
  return _is_empty(x) or isinstance(x, _quantized.QuantizedArray)


def stochastic_round(x: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike,
                     key: jax.Array) -> jax.Array:
  """Rounds ``x`` to ``dtype`` at random, so that ``E[result] == x``.

  A value between two neighbours ``lo < x < hi`` of ``dtype`` becomes ``hi``
  with probability ``(x - lo) / (hi - lo)`` and ``lo`` otherwise. For
  bfloat16 this is exact in distribution: uniform random bits are added to
  the 16 float32 bits below bfloat16's mantissa and then truncated (the
  carry happens with exactly that probability, for either sign). float16 uses
  the same rule on its two neighbours (probability resolution 2^-24).
  float32 is returned unchanged. Infinities and NaNs are kept; a finite value
  beyond the largest finite value of ``dtype`` saturates to it (keeping its
  sign) instead of becoming infinite. The result depends only on ``x`` and
  ``key``. The random bits are a counter-based hash of each element's index
  and ``key``, computed elementwise, so under jit the rounding fuses with
  whatever computes ``x`` and allocates no buffer of random numbers.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> x = jnp.full((20_000,), 1.0 + 2.0**-9)  # a quarter of the way to 1 + 2^-7
    >>> r = subspax.stochastic_round(x, jnp.bfloat16, jax.random.key(0))
    >>> r.dtype, sorted(set(r.astype(float).tolist()))
    (dtype(bfloat16), [1.0, 1.0078125])
    >>> bool(abs(r.astype(jnp.float32).mean() - x[0]) < 1e-4)
    True

  Args:
    x: A float32 array (other float dtypes are converted to float32 first).
    dtype: The target dtype: bfloat16, float16 or float32.
    key: A ``jax.random.key`` (or a legacy uint32 key).

  Returns:
    An array of ``x``'s shape in ``dtype``.

  Raises:
    ValueError: for any other ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x, jnp.float32)
  if dtype == jnp.float32:
    return x
  if dtype == jnp.bfloat16:
    rounded = _round_bf16(x, key)
  elif dtype == jnp.float16:
    rounded = _round_by_neighbours(x, dtype, key)
  else:
    raise ValueError(
        f"stochastic_round: dtype must be bfloat16, float16 or float32, got {dtype}")
  big = jnp.finfo(dtype).max
  finite = jnp.isfinite(x)
  saturated = jnp.where(finite & jnp.isinf(rounded),
                        jnp.copysign(big, x).astype(dtype), rounded)
  return jnp.where(finite, saturated, x.astype(dtype))


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection whose output bits each depend on
  every input bit."""
  h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """32 random bits per element, uint32: a hash of the element's row-major
  index and two words drawn from ``key``.

  Computed elementwise from iotas, so XLA fuses it into the rounding and the
  update: no buffer of random bits is allocated (``jax.random.bits`` of the
  parameters' shape is one, which added 60 GB of temporaries to a LLaMA-7B
  step). Indices repeat beyond 2^32 elements per key (a stacked leaf draws
  one key per layer).
  """
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + (jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
                     * np.uint32(stride))
    stride = stride * shape[axis] % 2**32
  return _fmix32(_fmix32(index * np.uint32(0x9E3779B9) + seed[0]) ^ seed[1])


def stochastic_quantize(x: jax.typing.ArrayLike, key: jax.Array,
                        mode: str = "linear") -> _quantized.QuantizedArray:
  """Block-wise 8-bit storage of ``x`` with unbiased stochastic rounding.

  :func:`subspax.quantize` (one int8 code per value, one float32 absmax
  scale per block of 256 values of a row) whose codes round at random
  between the two levels around each value, so that
  ``E[dequantize(result)] == x``: updates far below a level's gap still
  move int8 weights in expectation. The random numbers are the
  counter-based hash of :func:`stochastic_round` (fused, no buffer), so the
  result depends only on ``x`` and ``key``.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> x = jnp.full((16, 256), 0.3).at[:, 0].set(1.0)  # 0.3 lies between levels
    >>> q = subspax.stochastic_quantize(x, jax.random.key(0))
    >>> q.codes.dtype, sorted(set(q.codes[:, 1:].ravel().tolist()))
    (dtype('int8'), [38, 39])
    >>> bool(abs(subspax.dequantize(q)[:, 1:].mean() - 0.3) < 1e-3)
    True

  Args:
    x: The values (float); blocks run along the last axis.
    key: A ``jax.random.key``.
    mode: The levels: ``"linear"`` (absmax int8) or ``"quantile"``.

  Returns:
    A signed :class:`subspax.QuantizedArray` with ``x``'s shape.
  """
  x = jnp.asarray(x, jnp.float32)
  uniform = (_random_bits(key, x.shape) >> 8).astype(jnp.float32) * 2.0**-24
  return _quantized.quantize(x, mode, uniform=uniform)


def _round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  """bfloat16 by adding random low bits to float32's and truncating them."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = _random_bits(key, x.shape) >> 16  # uniform on [0, 2^16)
  kept = (bits + noise) & np.uint32(0xFFFF0000)
  # Exact: the low 16 bits are zero, so the value is a bfloat16.
  return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)


def _round_by_neighbours(x: jax.Array, dtype: jnp.dtype, key: jax.Array
                         ) -> jax.Array:
  """Any float dtype: choose between the two neighbours of ``x`` in ``dtype``."""
  near = x.astype(dtype)
  below = near.astype(jnp.float32) > x
  lo = jnp.where(below, jnp.nextafter(near, jnp.array(-jnp.inf, dtype)), near)
  hi = jnp.where(below, near, jnp.nextafter(near, jnp.array(jnp.inf, dtype)))
  lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
  # x - lo and hi - lo are exact (Sterbenz); only the quotient rounds.
  uniform = (_random_bits(key, x.shape) >> 8).astype(jnp.float32) * 2.0**-24
  up = uniform * (hi32 - lo32) < x - lo32
  return jnp.where(up, hi, lo)


def _leaf_key(key: jax.Array, path: tuple) -> jax.Array:
  """The rounding key of the leaf at ``path`` (in the full parameter tree):
  the same for the same path whatever else the tree holds."""
  crc = zlib.crc32(jax.tree_util.keystr(tuple(path)).encode())
  return jax.random.fold_in(key, np.uint32(crc))


def _stacked_flags(stacked: Stacked, params: Any) -> Callable[[tuple, Any], bool]:
  """``stacked`` as a ``(path, leaf) -> bool`` function."""
  if stacked is None or isinstance(stacked, bool):
    return lambda path, leaf: bool(stacked)
  if callable(stacked):
    return stacked
  flags = jax.tree.map(
      lambda flag, sub: jax.tree.map(lambda _: flag, sub, is_leaf=_is_leaf),
      stacked, params, is_leaf=_is_leaf)
  by_path = dict(jax.tree_util.tree_flatten_with_path(flags, is_leaf=_is_leaf)[0])
  return lambda path, leaf: bool(by_path[path])


def apply_updates(params: optax.Params, updates: optax.Updates, *,
                  key: Optional[jax.Array] = None, stacked: Stacked = None,
                  layer: Optional[Union[int, jax.Array]] = None) -> optax.Params:
  """``params + updates``, in float32, rounded to each parameter's dtype.

  Like :func:`optax.apply_updates`, but the sum is always computed in float32
  (or wider) and, when ``key`` is given, rounded to parameters narrower than
  float32 (bfloat16, float16) with :func:`stochastic_round`; without a key it
  is rounded to nearest. Leaf keys depend only on the leaf's path, so any
  split of the tree gives the same result:

  * the leaf at ``path`` (in the full parameter tree) rounds with
    ``fold_in(key, crc32(jax.tree_util.keystr(path)))``;
  * a stacked leaf (leading axis = layers) rounds layer ``l`` with
    ``fold_in(leaf_key, l)``;
  * with ``layer=l``, the stacked leaves of ``params`` and ``updates`` hold
    layer ``l`` only (leading axis removed) and round exactly as slice ``l``
    of the whole-stack call does, for a trainer that updates one layer at a
    time. Pass subtrees with their full-tree nesting (e.g.
    ``{'blocks': layer_l}``) so that paths stay the same.

  A parameter stored as a :class:`subspax.QuantizedArray` (8-bit weights)
  is dequantized, the update added in float32, and the sum quantized again
  in the same mode: with :func:`stochastic_quantize` and the leaf's key
  (per layer as above) when ``key`` is given, to the nearest level
  otherwise. Its update is a float array of its shape.

  Leaves that are ``None`` or ``optax.MaskedNode()`` in both trees pass
  through unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp, subspax
    >>> p = {'w': jnp.ones((3, 4), jnp.bfloat16)}
    >>> u = {'w': jnp.full((3, 4), 1e-3)}  # below half a bfloat16 ulp of 1
    >>> subspax.apply_updates(p, u)['w'][0, 0]  # round to nearest: lost
    Array(1, dtype=bfloat16)
    >>> new = subspax.apply_updates(p, u, key=jax.random.key(0), stacked=True)
    >>> new['w'].dtype, new['w'].shape
    (dtype(bfloat16), (3, 4))
    >>> one = subspax.apply_updates({'w': p['w'][1]}, {'w': u['w'][1]},
    ...                             key=jax.random.key(0), stacked=True, layer=1)
    >>> bool((one['w'] == new['w'][1]).all())
    True

  Args:
    params: A pytree of parameters.
    updates: A pytree of updates with the structure of ``params``.
    key: The step's rounding key (``jax.random.key``); None rounds to nearest.
    stacked: Which leaves are stacked over layers: a bool, a bool pytree
      prefix of ``params``, or a callable ``(path, leaf) -> bool``; None: none.
    layer: The layer held by the stacked leaves (an int or a traced int32
      scalar); None: they hold every layer.

  Returns:
    The new parameters, each in its own dtype.
  """
  is_stacked = _stacked_flags(stacked, params)

  def apply(path, p, u):
    if _is_empty(p):
      return p
    if isinstance(p, _quantized.QuantizedArray):
      return apply_quantized(path, p, u)
    p = jnp.asarray(p)
    wide = jnp.promote_types(jnp.promote_types(p.dtype, jnp.asarray(u).dtype),
                             jnp.float32)
    total = p.astype(wide) + jnp.asarray(u).astype(wide)
    if (key is None or not jnp.issubdtype(p.dtype, jnp.floating)
        or jnp.finfo(p.dtype).bits >= 32):
      return total.astype(p.dtype)
    k = _leaf_key(key, path)
    if not is_stacked(path, p):
      return stochastic_round(total, p.dtype, k)
    if layer is not None:
      return stochastic_round(total, p.dtype, jax.random.fold_in(k, layer))
    keys = jax.vmap(lambda l: jax.random.fold_in(k, l))(jnp.arange(p.shape[0]))
    return jax.vmap(lambda kl, t: stochastic_round(t, p.dtype, kl))(keys, total)

  def apply_quantized(path, p, u):
    if not p.signed:
      raise ValueError(f"apply_updates: the quantized parameter at "
                       f"{jax.tree_util.keystr(tuple(path))} must be signed.")
    total = _quantized.dequantize(p) + jnp.asarray(u).astype(jnp.float32)
    if key is None:
      return _quantized.quantize(total, p.mode)
    k = _leaf_key(key, path)
    if not is_stacked(path, p):
      return stochastic_quantize(total, k, p.mode)
    if layer is not None:
      return stochastic_quantize(total, jax.random.fold_in(k, layer), p.mode)
    keys = jax.vmap(lambda l: jax.random.fold_in(k, l))(jnp.arange(p.shape[0]))
    return jax.vmap(lambda kl, t: stochastic_quantize(t, kl, p.mode))(keys, total)

  return jax.tree_util.tree_map_with_path(apply, params, updates, is_leaf=_is_leaf)

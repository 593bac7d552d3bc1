"""How a basis is stored between steps, and read back for use.

A dense basis ``S`` (``d x r``) is the largest part of a tracked method's
state after the moments: at LLaMA-7B, rank 1024, 0.9B numbers. The core keeps
its floating-point part in ``basis_dtype``:

* a float dtype (float32, bfloat16): cast;
* ``"int8"``: block-wise 8 bits, one int8 code per value and one float32
  absmax per 256 values of a row of ``S`` (:func:`subspax.quantize` with
  linear levels, rounded to nearest), as Q-GaLore keeps its projections in
  low precision. Only matrices are quantized; the vectors of a row selector
  (GRASS's scales) stay float32.

The basis is always used in float32: every projection, every refresh and
every moment transition reads :func:`load`'s value. A refresh stores its new
basis with :func:`store` and uses the stored value from then on
(``subspax._transitions``), so the moment rotation ``S_new^T S_old`` and the
following steps see the same basis. A step that does not refresh writes the
stored basis back as it was read: no rounding accumulates between refreshes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from subspax import _quantized

INT8 = "int8"  # the basis_dtype that stores matrices in 8 bits


def check_dtype(basis_dtype: Any) -> Any:
  """``basis_dtype`` as the core records it: ``"int8"`` or a float dtype.

  Raises:
    ValueError: Neither ``"int8"`` nor a floating-point dtype.
  """
  if isinstance(basis_dtype, str) and basis_dtype == INT8:
    return INT8
  try:
    dtype = jnp.dtype(basis_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'basis_dtype must be a floating-point dtype or "{INT8}", '
                     f"got {basis_dtype!r}.")
  return dtype


def zeros(template: Any, batched, basis_dtype: Any) -> Any:
  """The zero stored basis of ``template`` (a policy's ``zeros(d, r)``).

  Args:
    template: One matrix's basis, unbatched (e.g. ``DenseBasis((d, r))``).
    batched: Maps a trailing shape to the parameter's batched shape.
    basis_dtype: ``"int8"`` or a float dtype (see the module docstring).

  Returns:
    The basis tree with each array batched and stored as ``basis_dtype``
    says; integer parts (row indices) keep their dtype.
  """
  def one(a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.zeros(batched(a.shape), a.dtype)
    if basis_dtype == INT8:
      if a.ndim >= 2:
        return _quantized.zeros(batched(a.shape), "linear", signed=True)
      return jnp.zeros(batched(a.shape), jnp.float32)
    return jnp.zeros(batched(a.shape), basis_dtype)
  return jax.tree.map(one, template)


def _is_stored_leaf(x) -> bool:
  return isinstance(x, _quantized.QuantizedArray)


def load(stored: Any) -> Any:
  """The basis in float32 (dequantized or cast); integer parts as they are."""
  def one(a):
    if isinstance(a, _quantized.QuantizedArray):
      return _quantized.dequantize(a)
    return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return jax.tree.map(one, stored, is_leaf=_is_stored_leaf)


def store(value: Any, like: Any) -> Any:
  """``value`` (a float32 basis) stored as ``like`` is: quantized or cast."""
  return jax.tree.map(lambda old, new: _quantized.store(new, old), like, value,
                      is_leaf=_is_stored_leaf)

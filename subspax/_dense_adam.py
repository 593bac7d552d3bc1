"""Adam with 8-bit moments for the parameters a method does not project.

With ``quantize_moments`` on, the reduced moments are stored block-wise in 8
bits (:mod:`subspax._quantized`); the parameters routed to plain Adam (the
embedding and the LM head of a language model: LLaMA-7B's two 32000 x 4096
matrices hold 0.26B values, 1 GiB of moments in bfloat16) would keep theirs
at full width. This transformation stores them the same way, as 8-bit Adam
does for its large tensors: one code per value and one float32 absmax per
256 values of a row, ``nu`` as its rounded-up square root, for every matrix
(or stack) whose rows hold at least 256 values. Vectors (biases, unstacked
norm scales) and narrower matrices keep :func:`optax.scale_by_adam`. The
moments are computed in float32 with the reduced step's formulas
(``subspax._reduced_adam``), so both halves of a method take the same Adam
step.

References:
  Dettmers et al., 8-bit Optimizers via Block-wise Quantization,
  https://arxiv.org/abs/2110.02861
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from subspax import _blocks
from subspax import _quantized
from subspax import _reduced_adam


def quantizes(param: Any) -> bool:
  """Whether a parameter's moments are stored in 8 bits: a matrix (or a
  stack) whose rows fill at least one 8-bit block.

  The rule reads the trailing axes only, so one layer of a stacked
  ``(L, ...)`` parameter is treated as the stack is (layer-wise updates).
  """
  return param.ndim >= 2 and param.shape[-1] >= _quantized.BLOCK_SIZE


def scale_by_adam(b1: float, b2: float, eps: float, mu_dtype: Any,
                  mode: str) -> optax.GradientTransformation:
  """Adam's normalized step; 8-bit moments for parameters that `quantizes`.

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Added to ``sqrt(nu_hat)``.
    mu_dtype: ``mu``'s dtype for the parameters kept at full width.
    mode: ``"linear"`` or ``"quantile"`` levels (:func:`subspax.quantize`).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    ``optax.ScaleByAdamState`` (the 8-bit part) inside an ``optax.partition``.
  """
  quantized = _scale_by_quantized_adam(b1, b2, eps, mode)
  plain = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  return optax.partition(
      {"8bit": quantized, "plain": plain},
      lambda params: jax.tree.map(
          lambda p: "8bit" if quantizes(p) else "plain", params))


def _scale_by_quantized_adam(b1, b2, eps, mode) -> optax.GradientTransformation:
  """Adam on every leaf, its moments block-wise in 8 bits."""

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: _quantized.zeros(p.shape, mode, True),
                        params),
        nu=jax.tree.map(lambda p: _quantized.zeros(p.shape, mode, False),
                        params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)

    def one(g, mu, nu):
      mu_new, nu_new = _reduced_adam.moments_step(
          b1, b2, g.astype(jnp.float32), mu, nu)
      step = _reduced_adam.normalized_step(b1, b2, eps, mu_new, nu_new, count)
      return (step.astype(g.dtype), _quantized.store(mu_new, mu),
              _quantized.store(nu_new, nu))

    grads, treedef = jax.tree.flatten(updates)
    mus, nus = (treedef.flatten_up_to(m) for m in (state.mu, state.nu))
    out = [_in_row_blocks(one, *leaf) for leaf in zip(grads, mus, nus)]
    steps, mus, nus = ([treedef.unflatten(column) for column in zip(*out)]
                       if out else (updates, state.mu, state.nu))
    return steps, optax.ScaleByAdamState(count=count, mu=mus, nu=nus)

  return optax.GradientTransformation(init_fn, update_fn)


def _in_row_blocks(one, g: jax.Array, mu, nu):
  """``one(g, mu, nu)`` computed one block of rows at a time, in place.

  An embedding's float32 moments and their 8-bit encoding would otherwise
  be full-size temporaries (LLaMA-7B's 32000 x 4096: 0.5 GiB each). The
  parameter is viewed as ``(rows, D)`` (blocks of codes never span two rows)
  and split as the core splits a matrix (``subspax.num_row_blocks``); each
  block's step and moments are written over its gradient and old moments,
  the loop's carry, which XLA updates in the donated buffers.
  """
  as_rows = lambda a: a.reshape((-1, a.shape[-1]))
  carry = (as_rows(g), jax.tree.map(as_rows, mu), jax.tree.map(as_rows, nu))
  size = carry[0].shape[0] // _blocks.num_row_blocks(carry[0].shape[0])

  def body(b, carry):
    start = b * size
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
    put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(
        a, x.astype(a.dtype), start, 0)
    new = one(*jax.tree.map(take, carry))
    return jax.tree.map(put, carry, new)

  rows = jax.lax.fori_loop(0, carry[0].shape[0] // size, body, carry)
  return jax.tree.map(lambda a, like: a.reshape(like.shape), rows, (g, mu, nu))

"""``with_moment_dtype``: an optax state kept in a dtype other than the parameters'.

optax keeps some state in the parameters' dtype (``optax.scale_by_adam``'s
``nu``; every moment of ``optax.contrib.galore``'s base optimizer): with
bfloat16 weights those moments are bfloat16 too. This wrapper keeps them in a
dtype of the caller's choice, for any transformation, including those whose
``update`` takes extra arguments (``layer=``, ``refresh=``), which it passes
on unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def with_moment_dtype(tx: optax.GradientTransformation, dtype: Any
                      ) -> optax.GradientTransformationExtraArgs:
  """`tx` whose state follows `dtype` where it would follow the parameters'.

  The state is initialised from the parameters cast to `dtype` (only their
  shapes and dtypes are read, so nothing is allocated under jit), and every
  update casts the new state back to the dtypes of the old one, so the state's
  dtypes never change. State with a dtype of its own (float32 bases, a
  `mu_dtype`, int counters) is untouched.

  Examples:
    >>> import jax.numpy as jnp, optax, subspax
    >>> tx = subspax.with_moment_dtype(optax.adam(1e-3), jnp.float32)
    >>> state = tx.init({'w': jnp.ones((2, 2), jnp.bfloat16)})
    >>> state[0].nu['w'].dtype
    dtype('float32')

  Args:
    tx: Any optax transformation.
    dtype: The dtype of the state that would have the parameters' dtype.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra arguments of
    ``update`` go to ``tx``.
  """
  def cast(tree):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree)

  def init(params):
    return tx.init(cast(params))

  tx = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, **extra_args):
    updates, new_state = tx.update(updates, state, params, **extra_args)
    return updates, jax.tree.map(
        lambda new, old: new if new.dtype == old.dtype else new.astype(old.dtype),
        new_state, state)

  return optax.GradientTransformationExtraArgs(init, update)

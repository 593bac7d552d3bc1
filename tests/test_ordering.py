"""subspax.ordering: each guarantee, on each compiler, where it is needed.

For every guarantee a compiler needs, one update compiled with it and with it
turned off (`ordering.disabled`): the temporaries must be smaller with it.
Where a compiler does not need one, it must cost nothing there. The GPU
programs come from XLA's GPU compiler for an H100, deviceless (the test
extra installs it).
"""

import jax
import jax.numpy as jnp
import pytest
import subspax
from subspax import ordering

from train import memory as memory_lib
from train import targets

# 6 separate (256, 512) leaves, or two stacks of 4 matrices.
LEAVES = {f"w{i}": (256, 512) for i in range(6)}
STACKED = {"a": (4, 256, 512), "b": (4, 512, 256)}


def _temp(device, method, shapes, off=(), **options) -> int:
  """Temporaries of an ordinary (non-refresh) update, grads and state donated."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  place = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  params = place({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  tx = subspax.METHODS[method](1e-3, 32, 200, **options)
  with ordering.disabled(*off):
    state = place(jax.eval_shape(tx.init, params))
    update = lambda g, s, p: tx.update(g, s, p, refresh=False)
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        params, state, params).compile()
  return memory_lib.compiled_memory(compiled)["temp"]


def _device(name):
  return targets.devices(targets.parse(name))[0]


# (compiler, guarantee, method, shapes, options): the guarantee is needed.
NEEDED = [
    ("cpu", ordering.READ_FIRST, "subtrack", STACKED, {}),
    ("cpu", ordering.READ_FIRST, "subtrack", LEAVES, {"quantize_moments": "quantile"}),
    ("cpu", ordering.RUN_AFTER, "subtrack", LEAVES, {}),
    ("cpu", ordering.ALLOCATE_LATE, "grass", LEAVES, {}),
    ("h100", ordering.RUN_AFTER, "subtrack", LEAVES, {"quantize_moments": "quantile"}),
    ("h100", ordering.ALLOCATE_LATE, "subtrack", LEAVES, {}),
]


@pytest.mark.parametrize("compiler, guarantee, method, shapes, options", NEEDED,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_each_guarantee_saves_memory_where_it_is_used(compiler, guarantee, method,
                                                       shapes, options):
  device = _device(compiler)
  with_it = _temp(device, method, shapes, **options)
  without = _temp(device, method, shapes, (guarantee,), **options)
  assert with_it < 0.9 * without, (with_it / 2**20, without / 2**20)


def test_read_first_is_free_on_the_gpu_compiler():
  """XLA's GPU pipeline keeps the stacked reads before the in-place writes by
  itself: `read_first` adds nothing there (no conditional, no barrier)."""
  device = _device("h100")
  assert (_temp(device, "subtrack", STACKED)
          == _temp(device, "subtrack", STACKED, (ordering.READ_FIRST,)))
  assert "conditional(" not in _read_first_hlo(device)
  assert "opt-barrier" not in _read_first_hlo(device)


def test_read_first_is_a_conditional_on_the_cpu_compiler():
  assert "conditional(" in _read_first_hlo(_device("cpu"))


def _read_first_hlo(device) -> str:
  sharding = jax.sharding.SingleDeviceSharding(device)
  stack = jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sharding)
  token = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
  read = lambda s, t: ordering.read_first(s, t, lambda x: x[t]) * 2
  return jax.jit(read).lower(stack, token).compile().as_text()


def test_guarantees_keep_values():
  stack = jnp.arange(24.0).reshape(4, 6)
  token = jnp.int32(2)
  assert (ordering.read_first(stack, token, lambda s: s[2]) == stack[2]).all()
  assert (ordering.run_after(stack, jnp.ones(3), token) == stack).all()
  assert ordering.run_after(token, stack, token) == 2
  assert ordering.allocate_late(token) == 0.0


def test_disabled_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown ordering guarantees"):
    with ordering.disabled("read_last"):
      pass

"""Stochastic rounding: unbiased, deterministic per key, and independent of
how a parameter tree is split (subspax/_rounding.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspax

N = 100_000  # samples per mean: its standard error is at most 0.0016 ulp


def _neighbours(lo, dtype):
  """(lo, next value of dtype above lo) as float32."""
  lo = jnp.asarray(lo, dtype)
  return float(lo), float(jnp.nextafter(lo, jnp.array(jnp.inf, dtype)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("lo", [1.0, -3.0, 1.9921875, 2.0**-100, 1e4])
@pytest.mark.parametrize("frac", [0.1, 0.25, 0.5, 0.9])
def test_unbiased_between_two_neighbours(dtype, lo, frac):
  if dtype == jnp.float16 and abs(lo) < 2.0**-24:
    pytest.skip("below float16's smallest subnormal")
  lo, hi = _neighbours(lo, dtype)
  x = np.float32(lo + frac * (hi - lo))
  rounded = subspax.stochastic_round(jnp.full((N,), x), dtype, jax.random.key(1))
  assert rounded.dtype == dtype
  values = np.asarray(rounded, np.float64)
  assert set(np.unique(values)) <= {lo, hi}
  ulp = hi - lo
  p = (float(x) - lo) / ulp  # the exact probability of rounding up
  tolerance = 5 * np.sqrt(p * (1 - p) / N)  # 5 standard errors, in ulps
  assert abs(values.mean() - float(x)) / ulp < tolerance
  # Round to nearest is off by min(p, 1 - p) ulps, every time.
  rn_error = abs(float(jnp.asarray(x).astype(dtype)) - float(x)) / ulp
  assert rn_error > min(p, 1 - p) - 1e-3 and rn_error > 10 * tolerance


def test_representable_values_are_kept_exactly():
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (4096,)), jnp.bfloat16)
  rounded = subspax.stochastic_round(x.astype(jnp.float32), jnp.bfloat16,
                                     jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(rounded), np.asarray(x))


def test_deterministic_per_key_and_different_across_keys():
  x = jax.random.normal(jax.random.key(0), (1000,))
  a = subspax.stochastic_round(x, jnp.bfloat16, jax.random.key(7))
  b = jax.jit(subspax.stochastic_round, static_argnums=1)(
      x, jnp.bfloat16, jax.random.key(7))
  c = subspax.stochastic_round(x, jnp.bfloat16, jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).sum() > 100


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_non_finite_kept_signs_kept_and_overflow_saturates(dtype):
  big = float(jnp.finfo(jnp.float32).max)
  x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, -0.0, 0.0, big, -big,
                 -1e-30, 1e-30] * 100, jnp.float32)
  r = np.asarray(subspax.stochastic_round(x, dtype, jax.random.key(0)),
                 np.float32).reshape(100, -1)
  top = float(jnp.finfo(dtype).max)
  assert (r[:, 0] == np.inf).all() and (r[:, 1] == -np.inf).all()
  assert np.isnan(r[:, 2]).all()
  assert np.signbit(r[:, 3]).all() and not np.signbit(r[:, 4]).any()
  assert (r[:, 5] == top).all() and (r[:, 6] == -top).all()
  assert np.signbit(r[:, 7]).all() and not np.signbit(r[:, 8]).any()


def test_nan_payloads_do_not_wrap_into_the_sign():
  bits = jnp.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF], jnp.uint32)
  x = jax.lax.bitcast_convert_type(jnp.tile(bits, 100), jnp.float32)
  r = subspax.stochastic_round(x, jnp.bfloat16, jax.random.key(0))
  assert np.isnan(np.asarray(r, np.float32)).all()


def test_float32_is_the_identity_and_other_dtypes_are_refused():
  x = jax.random.normal(jax.random.key(0), (64,))
  np.testing.assert_array_equal(
      np.asarray(subspax.stochastic_round(x, jnp.float32, jax.random.key(0))),
      np.asarray(x))
  with pytest.raises(ValueError, match="dtype must be bfloat16"):
    subspax.stochastic_round(x, jnp.int8, jax.random.key(0))


def _stack():
  """bfloat16 params with a stacked (4, 8, 16) leaf, and float32 updates."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"blocks": {"w": jax.random.normal(k1, (4, 8, 16)).astype(jnp.bfloat16),
                       "scale": jnp.ones((4, 16), jnp.bfloat16)},
            "embed": jax.random.normal(k2, (10, 16)).astype(jnp.bfloat16),
            "frozen": optax.MaskedNode(), "none": None}
  arrays = {k: params[k] for k in ("blocks", "embed")}
  updates = jax.tree.map(lambda p: 1e-3 * jax.random.normal(k3, p.shape), arrays)
  updates.update(frozen=optax.MaskedNode(), none=None)
  return params, updates


def _is_block(path, leaf):
  return path[0] == jax.tree_util.DictKey("blocks")


def _assert_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_layer_by_layer_equals_the_whole_stack_bit_exactly():
  params, updates = _stack()
  key = jax.random.key(5)
  whole = jax.jit(lambda p, u: subspax.apply_updates(
      p, u, key=key, stacked=_is_block))(params, updates)
  assert whole["frozen"] == optax.MaskedNode() and whole["none"] is None
  assert jax.tree.map(lambda x: x.dtype, whole) == jax.tree.map(lambda x: x.dtype, params)

  def one_layer(l, blocks, block_updates):  # l traced, as in a scan over layers
    return subspax.apply_updates({"blocks": blocks}, {"blocks": block_updates},
                                 key=key, stacked=_is_block, layer=l)["blocks"]

  def scan_body(_, xs):
    l, blocks, block_updates = xs
    return None, one_layer(l, blocks, block_updates)

  _, by_scan = jax.lax.scan(scan_body, None, (
      jnp.arange(4), params["blocks"], updates["blocks"]))
  _assert_equal(by_scan, whole["blocks"])
  for l in range(4):  # a Python int layer, eagerly
    sliced = jax.tree.map(lambda x: x[l], (params["blocks"], updates["blocks"]))
    _assert_equal(one_layer(l, *sliced), jax.tree.map(lambda x: x[l], whole["blocks"]))
  # The rest of the tree, on its own, rounds as in the whole call.
  rest = subspax.apply_updates({"embed": params["embed"]}, {"embed": updates["embed"]},
                               key=key, stacked=_is_block)
  _assert_equal(rest["embed"], whole["embed"])


def test_stacked_prefix_equals_callable():
  params, updates = _stack()
  key = jax.random.key(2)
  prefix = {"blocks": True, "embed": False, "frozen": False, "none": False}
  _assert_equal(subspax.apply_updates(params, updates, key=key, stacked=prefix),
                subspax.apply_updates(params, updates, key=key, stacked=_is_block))


def test_without_key_it_is_optax_apply_updates_in_float32():
  params, updates = _stack()
  ours = subspax.apply_updates(params, updates)
  want = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype),
                      params["blocks"], updates["blocks"])
  _assert_equal(ours["blocks"], want)
  f32 = jax.tree.map(lambda p: p.astype(jnp.float32), params["blocks"])
  _assert_equal(subspax.apply_updates(f32, updates["blocks"], key=jax.random.key(0)),
                optax.apply_updates(f32, updates["blocks"]))


def test_small_updates_accumulate_in_expectation():
  """1000 updates of 1e-4 to bfloat16 ones: round to nearest loses them all
  (half an ulp of 1 is 2^-8); stochastic rounding adds about 0.1."""
  p = {"w": jnp.ones((2048,), jnp.bfloat16)}
  u = {"w": jnp.full((2048,), 1e-4)}

  def body(i, p):
    return subspax.apply_updates(p, u, key=jax.random.fold_in(jax.random.key(0), i))

  sr = jax.lax.fori_loop(0, 1000, body, p)["w"].astype(jnp.float32)
  rn = jax.lax.fori_loop(0, 1000, lambda i, p: subspax.apply_updates(p, u), p)["w"]
  assert (rn == 1).all()
  assert abs(float(sr.mean()) - 1.1) < 0.01


def test_rounding_allocates_no_buffer_of_random_bits():
  """Under jit the rounding fuses with the update: the compiled step has no
  temporaries (jax.random.bits of the leaf's shape would add 8 bytes per
  element)."""
  p = jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16)

  def step(p, g):
    u = -1e-3 * g.astype(jnp.float32) * jnp.sign(p.astype(jnp.float32))
    return subspax.apply_updates({"blocks": p}, {"blocks": u},
                                 key=jax.random.key(0), stacked=True)

  memory = jax.jit(step, donate_argnums=0).lower(p, p).compile().memory_analysis()
  assert memory.temp_size_in_bytes < 4096  # the leaf is 1 MiB


# --- Independence of the random bits ------------------------------------------
HALF = 1.0 + 2.0**-8  # halfway between the bfloat16 neighbours 1 and 1 + 2^-7
ULP = 2.0**-7


def _decisions(rounded):
  """+-1 per element: rounded up (to 1 + 2^-7) or down (to 1)."""
  return np.where(np.asarray(rounded, np.float32) > HALF, 1.0, -1.0)


def _correlation(a, b):
  a, b = a.ravel(), b.ravel()
  return float(np.mean((a - a.mean()) * (b - b.mean())) / (a.std() * b.std()))


def test_rounding_decisions_are_uncorrelated_across_elements_and_layers():
  """At p = 1/2, the decisions of neighbours along rows, columns, both
  diagonals, at power-of-two strides and in adjacent layers of a stack are
  uncorrelated (each estimate within 5 standard errors, 5 / sqrt(n), of 0)."""
  layers, rows, cols = 4, 256, 256
  x = jnp.full((layers, rows, cols), HALF - 1.0)
  new = subspax.apply_updates({"w": jnp.ones((layers, rows, cols),
                                             jnp.bfloat16)},
                              {"w": x}, key=jax.random.key(11), stacked=True)
  d = _decisions(new["w"])
  assert abs(d.mean()) < 5 / np.sqrt(d.size)  # unbiased
  pairs = {
      "row neighbours": (d[:, :, :-1], d[:, :, 1:]),
      "column neighbours": (d[:, :-1, :], d[:, 1:, :]),
      "diagonal": (d[:, :-1, :-1], d[:, 1:, 1:]),
      "anti-diagonal": (d[:, :-1, 1:], d[:, 1:, :-1]),
      "adjacent layers": (d[:-1], d[1:]),
  }
  for stride in (2, 16, 64, 128):
    pairs[f"stride {stride} along rows"] = (d[:, :, :-stride], d[:, :, stride:])
    pairs[f"stride {stride} along columns"] = (d[:, :-stride], d[:, stride:])
  for name, (a, b) in pairs.items():
    assert abs(_correlation(a, b)) < 5 / np.sqrt(a.size), name


def test_rounding_error_of_a_sum_has_the_variance_of_independent_roundings():
  """The error of ``sum(round(x)) - sum(x)`` over a 64 x 64 matrix, over 2000
  keys, has variance ``n p (1 - p) ulp^2`` (independent roundings), within
  5 standard errors of a variance estimate (``sqrt(2 / keys)`` relative)."""
  keys, n = 2000, 64 * 64
  x = jnp.full((64, 64), HALF)
  sums = jax.jit(jax.vmap(lambda k: jnp.sum(subspax.stochastic_round(
      x, jnp.bfloat16, k).astype(jnp.float32) - x)))(
          jax.random.split(jax.random.key(12), keys))
  errors = np.asarray(sums, np.float64) / ULP
  expected = n * 0.25
  assert abs(errors.mean()) < 5 * np.sqrt(expected / keys)
  assert abs(errors.var() / expected - 1) < 5 * np.sqrt(2 / keys)

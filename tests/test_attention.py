"""The blockwise attention equals XLA's, and its memory grows linearly with L."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from train import attention
from train import dry_run
from train import model as model_lib


def _qkv_and_cotangent(seq_len, n_heads, kv_heads, dtype, b=2, h=16):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seq_len), 4)
  q = jax.random.normal(kq, (b, seq_len, n_heads, h), dtype)
  k = jax.random.normal(kk, (b, seq_len, kv_heads, h), dtype)
  v = jax.random.normal(kv, (b, seq_len, kv_heads, h), dtype)
  return q, k, v, jax.random.normal(kw, (b, seq_len, n_heads, h), jnp.float32)


def _value_and_grads(kind, block, q, k, v, w):
  def loss(q, k, v):
    out = attention.attend(q, k, v, kind=kind, block_size=block)
    return jnp.sum(out.astype(jnp.float32) * w), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
      q, k, v)
  return out, grads


# (L, block): several blocks with a partial last one, an exact multiple, one
# block shorter than block_size. Heads (4, 2) are grouped, (4, 4) are not.
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("seq_len, block, heads", [
    (37, 8, (4, 2)), (32, 16, (4, 4)), (11, 64, (6, 2))],
    ids=["gqa-partial-last-block", "mha-whole-blocks", "gqa-one-short-block"])
def test_blockwise_equals_xla_in_values_and_gradients(seq_len, block, heads, dtype,
                                                      tol):
  q, k, v, w = _qkv_and_cotangent(seq_len, *heads, dtype)
  ref_out, ref_grads = _value_and_grads("xla", block, q, k, v, w)
  out, grads = _value_and_grads("blockwise", block, q, k, v, w)
  assert out.dtype == dtype and out.shape == ref_out.shape
  for got, want in zip((out, *grads), (ref_out, *ref_grads)):
    assert got.dtype == want.dtype
    want = np.asarray(want, np.float32)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale, want / scale,
                               atol=tol)


def test_blockwise_is_causal():
  q, k, v, _ = _qkv_and_cotangent(20, 4, 2, jnp.float32)
  out = attention.blockwise_attention(q, k, v, 6)
  later = k.at[:, 10:].set(0.0), v.at[:, 10:].set(5.0)
  np.testing.assert_array_equal(
      attention.blockwise_attention(q, *later, 6)[:, :10], out[:, :10])


def test_bad_block_size_and_kind_are_refused():
  q, k, v, _ = _qkv_and_cotangent(8, 4, 2, jnp.float32)
  with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
    attention.blockwise_attention(q, k, v, 0)
  with pytest.raises(ValueError, match="kind must be one of auto, xla, blockwise"):
    attention.attend(q, k, v, kind="flash")


@pytest.mark.slow
def test_model_with_blockwise_attention_equals_xla():
  """A scanned, rematerialised GQA model: the same logits and gradients."""
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=8, d_ff=64, scan=True, remat=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
  results = []
  for kind in ("xla", "blockwise"):
    cfg = model_lib.LlamaConfig(**base, attention=kind, attention_block=8)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = jax.jit(lambda: model_lib.init_params(cfg, 0))()
    loss = lambda p: model_lib.apply(graphdef, p, tokens).std()
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               *results)


def _temp_bytes(seq_len, target="", **overrides):
  cfg = helpers.make_config({}, seq_len=seq_len, batch_size=2, opt__name="adamw",
                            model__attention_block=64, **overrides)
  return dry_run.dry_run(cfg, target)["temp_bytes"]


def _growth(target="", **overrides):
  """temp(2L) / temp(L) of the test preset's train step at L = 1024."""
  return _temp_bytes(2048, target, **overrides) / _temp_bytes(1024, target, **overrides)


# Doubling L at most about doubles the temporaries of blockwise attention
# (buffer assignment moves a few percent); XLA's, holding the L x L scores,
# nearly quadruples them, which shows the test can tell.
LINEAR, QUADRATIC = 2.2, 3.5


def test_blockwise_temporaries_grow_linearly_on_the_cpu():
  """The layer-wise step: the forward scan and the backward scan that
  recomputes each block."""
  assert _growth(model__attention="blockwise", opt__layerwise=True) <= LINEAR


@pytest.mark.slow
@pytest.mark.parametrize("target", ["", "h100"], ids=["cpu", "h100"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
def test_temporaries_of_each_attention_per_compiler(target, layerwise):
  overrides = dict(opt__layerwise=layerwise)
  assert _growth(target, model__attention="blockwise", **overrides) <= LINEAR
  assert _growth(target, model__attention="xla", **overrides) > QUADRATIC


def test_auto_is_blockwise_beyond_one_block_and_xla_within_it():
  q, k, v, _ = _qkv_and_cotangent(8, 4, 2, jnp.float32)
  for block, kind in ((8, "xla"), (3, "blockwise")):
    np.testing.assert_array_equal(
        attention.attend(q, k, v, kind="auto", block_size=block),
        attention.attend(q, k, v, kind=kind, block_size=block))

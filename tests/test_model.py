"""Tests of the Flax NNX LLaMA in train/model.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import model as model_lib

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
            head_dim=8, d_ff=64)


def _init_and_apply(tokens_BxL, **overrides):
  cfg = model_lib.LlamaConfig(**{**TINY, **overrides})
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = jax.jit(lambda: model_lib.init_params(cfg, seed=0))()
  logits = jax.jit(lambda p, t: model_lib.apply(graphdef, p, t))(params, tokens_BxL)
  return params, logits


def _tokens(b=2, seq_len=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, seq_len), 0, TINY["vocab_size"])


@pytest.fixture(scope="module")
def plain_loop():
  """Params and logits of the unscanned, unrematerialised model."""
  return _init_and_apply(_tokens())


def test_logits_shape_and_dtype(plain_loop):
  _, logits = plain_loop
  chex.assert_shape(logits, (2, 16, TINY["vocab_size"]))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_kernels_are_plain_matrices_and_stack_under_scan():
  flat = model_lib.abstract_model(model_lib.LlamaConfig(**TINY))[1]
  assert flat["blocks"][0]["attn"]["q"]["kernel"].shape == (32, 32)
  assert flat["blocks"][0]["mlp"]["down"]["kernel"].shape == (64, 32)
  scanned = model_lib.abstract_model(model_lib.LlamaConfig(**TINY, scan=True))[1]
  assert scanned["blocks"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
  assert scanned["blocks"]["mlp"]["gate"]["kernel"].shape == (2, 32, 64)
  assert scanned["embed"]["embedding"].shape == (96, 32)
  assert scanned["head"]["kernel"].shape == (32, 96)


def test_logical_names_include_layers_axis_when_scanned():
  names = model_lib.abstract_model(model_lib.LlamaConfig(**TINY, scan=True))[2]
  assert tuple(names["blocks"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads")
  assert tuple(names["head"]["kernel"]) == ("embed", "vocab")


def test_attention_is_causal(plain_loop):
  tokens = _tokens()
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % TINY["vocab_size"])
  _, logits = plain_loop
  _, logits_changed = _init_and_apply(changed)
  np.testing.assert_array_equal(logits[:, :10], logits_changed[:, :10])
  assert not np.allclose(logits[:, 10:], logits_changed[:, 10:])


@pytest.mark.parametrize("overrides", [dict(scan=True), dict(remat=True),
                                       dict(scan=True, remat=True)])
def test_scan_and_remat_match_the_plain_loop(plain_loop, overrides):
  params, logits = plain_loop
  params_variant, logits_variant = _init_and_apply(_tokens(), **overrides)
  np.testing.assert_allclose(logits_variant, logits, atol=1e-5, rtol=1e-5)
  if overrides.get("scan"):  # the same per-layer init, stacked
    np.testing.assert_array_equal(
        params_variant["blocks"]["mlp"]["up"]["kernel"][1],
        params["blocks"][1]["mlp"]["up"]["kernel"])


def test_remat_gives_the_same_gradients():
  tokens = _tokens()

  def grads(remat):
    cfg = model_lib.LlamaConfig(**TINY, scan=True, remat=remat)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = model_lib.init_params(cfg, seed=0)
    loss = lambda p: model_lib.apply(graphdef, p, tokens).mean()
    return jax.jit(jax.grad(loss))(params)

  chex.assert_trees_all_close(grads(True), grads(False), atol=1e-6)


def test_grouped_query_attention():
  params, logits = _init_and_apply(_tokens(), n_kv_heads=2)
  assert params["blocks"][0]["attn"]["k"]["kernel"].shape == (32, 16)
  chex.assert_shape(logits, (2, 16, TINY["vocab_size"]))
  chex.assert_tree_all_finite(logits)


def test_bfloat16_compute_keeps_float32_master_weights(plain_loop):
  params, logits_bf16 = _init_and_apply(_tokens(), dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert logits_bf16.dtype == jnp.float32
  _, logits = plain_loop
  np.testing.assert_allclose(logits_bf16, logits, atol=2e-2)


def test_rotary_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, 8))
  seq_q = jnp.broadcast_to(q, (1, 12, 1, 8))
  seq_k = jnp.broadcast_to(k, (1, 12, 1, 8))
  rq = model_lib.rotary(seq_q, 10_000.0)[0, :, 0]
  rk = model_lib.rotary(seq_k, 10_000.0)[0, :, 0]
  scores = rq @ rk.T  # scores[i, j] depends on i - j only
  np.testing.assert_allclose(scores[5, 2], scores[9, 6], rtol=1e-5)
  np.testing.assert_allclose(scores[3, 3], scores[11, 11], rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q),
                             rtol=1e-5)


def test_projected_dims_lists_every_kernel():
  cfg = model_lib.LlamaConfig(**{**TINY, "n_kv_heads": 2})
  dims = cfg.projected_dims()
  assert dims["attn.k"] == (32, 16)
  assert dims["mlp.down"] == (64, 32)
  assert len(dims) == 7


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("reparam", ["rows", "dense"])
def test_variable_types_split_trainable_frozen_and_weights(scan, reparam):
  """Trainable vs frozen and the weights follow the nnx variable types."""
  cfg = model_lib.LlamaConfig(**TINY, scan=scan, reparam=reparam, reparam_rank=4)
  graphdef, shapes, names = model_lib.abstract_model(cfg)
  trainable, frozen = model_lib.partition(graphdef, shapes, model_lib.TRAINABLE, ...)
  assert model_lib.combine(trainable, frozen) == shapes
  layer = lambda tree: (tree["blocks"] if scan else tree["blocks"][0])["mlp"]["up"]
  assert set(layer(trainable)) == {"delta"}
  basis = {"rows": {"subspace_index", "subspace_scale"}, "dense": {"subspace_basis"}}
  assert set(layer(frozen)) == {"kernel"} | basis[reparam]
  assert {"embed", "head", "final_norm"} <= set(trainable) and "embed" not in frozen
  # The weights are a plain model's parameters (same paths, shapes, names).
  plain = model_lib.LlamaConfig(**TINY, scan=scan)
  plain_graphdef, plain_shapes, plain_names = model_lib.abstract_model(plain)
  weights, = model_lib.partition(graphdef, shapes, model_lib.WEIGHTS)
  assert weights == plain_shapes
  assert model_lib.partition(graphdef, names, model_lib.WEIGHTS)[0] == plain_names
  assert model_lib.count_params(cfg) == model_lib.count_params(plain) == sum(
      x.size for x in jax.tree.leaves(plain_shapes))
  assert model_lib.trainable(plain_graphdef, plain_shapes) == plain_shapes

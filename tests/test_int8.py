"""int8 kernels (`model.kernel_format="int8"`): storage, rounding, the step.

The blocks' kernels are stored block-wise in int8 (`subspax.quantize`,
"linear" levels), updated in float and re-quantized with unbiased stochastic
rounding (`subspax.stochastic_quantize`) keyed by (seed, step, layer).
"""

import dataclasses
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import subspax
from train import export
from train import hf
from train import model as model_lib
from train import precision
from train import train


def _block_scales(x):
  """Each value's block absmax (blocks of 256 along the last axis)."""
  b = subspax.quantize(x, "linear").scales
  return jnp.repeat(b, 256, axis=-1)[..., :x.shape[-1]]


def test_dequantize_quantize_error_is_within_half_a_level_per_block():
  # Rows of very different magnitudes and a last block of 44 values.
  x = jax.random.normal(jax.random.key(0), (6, 300))
  x = x * jnp.logspace(-6, 2, 6)[:, None]
  error = jnp.abs(subspax.dequantize(subspax.quantize(x, "linear")) - x)
  gap = _block_scales(x) / 127
  assert bool(jnp.all(error <= gap / 2 * (1 + 1e-5)))
  # Stochastic rounding moves at most one level.
  q = subspax.stochastic_quantize(x, jax.random.key(1))
  assert q.codes.dtype == jnp.int8 and q.scales.shape == (6, 2)
  assert bool(jnp.all(jnp.abs(subspax.dequantize(q) - x) <= gap * (1 + 1e-5)))


def test_stochastic_quantize_is_unbiased():
  x = jax.random.normal(jax.random.key(0), (8, 256))
  keys = jax.random.split(jax.random.key(1), 2000)
  mean = jax.jit(jax.vmap(lambda k: subspax.dequantize(
      subspax.stochastic_quantize(x, k))))(keys).mean(0)
  # One draw errs by at most one level (gap); its std is at most gap / 2.
  sigma = _block_scales(x) / 127 / 2 / np.sqrt(len(keys))
  assert float(jnp.max(jnp.abs(mean - x) / sigma)) < 5.5
  # Round to nearest is biased for a value a quarter of the way up a level.
  quarter = jnp.full((1, 256), 0.25 / 127).at[0, 0].set(1.0)
  assert float(subspax.dequantize(subspax.quantize(quarter, "linear"))[0, 1]) == 0.0
  sr = jax.vmap(lambda k: subspax.dequantize(subspax.stochastic_quantize(
      quarter, k)))(keys)[:, 0, 1:]
  np.testing.assert_allclose(float(sr.mean()), 0.25 / 127, rtol=0.02)


def test_stochastic_quantize_is_deterministic_for_a_key():
  x = jax.random.normal(jax.random.key(0), (4, 512))
  a = subspax.stochastic_quantize(x, jax.random.key(3))
  b = jax.jit(subspax.stochastic_quantize)(x, jax.random.key(3))
  c = subspax.stochastic_quantize(x, jax.random.key(4))
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_array_equal(a.scales, b.scales)
  assert bool(jnp.any(a.codes != c.codes))


def test_apply_updates_requantizes_a_layer_as_the_stack():
  q = subspax.quantize(jax.random.normal(jax.random.key(0), (3, 8, 300)), "linear")
  u = 1e-3 * jax.random.normal(jax.random.key(1), (3, 8, 300))
  key = jax.random.key(2)
  whole = subspax.apply_updates({"w": q}, {"w": u}, key=key, stacked=True)["w"]
  one = subspax.apply_updates({"w": jax.tree.map(lambda a: a[1], q)},
                              {"w": u[1]}, key=key, stacked=True, layer=1)["w"]
  assert isinstance(whole, subspax.QuantizedArray) and whole.codes.dtype == jnp.int8
  np.testing.assert_array_equal(one.codes, whole.codes[1])
  np.testing.assert_array_equal(one.scales, whole.scales[1])
  nearest = subspax.apply_updates({"w": q}, {"w": u})["w"]  # no key
  expected = subspax.quantize(subspax.dequantize(q) + u, "linear")
  np.testing.assert_array_equal(nearest.codes, expected.codes)


def _small(name="subtrack", **overrides):
  return helpers.make_config(
      {}, **{"opt__name": name, "opt__update_interval": 2, "seq_len": 16,
             "batch_size": 4, "opt__layerwise": True,
             "model__kernel_format": "int8", **overrides})


def test_int8_kernels_are_stored_in_int8_and_the_rest_in_param_dtype():
  cfg = _small(model__param_dtype="bfloat16")
  programs = train.build_programs(cfg, 64)
  state = jax.eval_shape(programs.init)
  kernel = state.params["blocks"]["mlp"]["up"]["kernel"]  # (L, D, F) = (2, 32, 96)
  assert kernel.codes.shape == (2, 32, 96) and kernel.codes.dtype == jnp.int8
  assert kernel.scales.shape == (2, 32, 1) and kernel.scales.dtype == jnp.float32
  for leaf in (state.params["embed"]["embedding"], state.params["head"]["kernel"],
               state.params["blocks"]["attn_norm"]["scale"]):
    assert leaf.dtype == jnp.bfloat16
  float_cfg = _small(model__param_dtype="bfloat16", model__kernel_format="float")
  n = model_lib.count_params(programs.model_cfg)
  assert n == model_lib.count_params(train.build_programs(float_cfg, 64).model_cfg)
  # One byte per kernel weight and 4 per 256 (one block per row here).
  kernels = 2 * (4 * 32 * 32 + 3 * 32 * 96)
  rows = 2 * (4 * 32 + 2 * 32 + 96)
  assert subspax.state_bytes(state.params) == 2 * (n - kernels) + kernels + 4 * rows


def test_the_int8_model_is_the_float_model_of_its_dequantized_weights():
  cfg = _small()
  programs = train.build_programs(cfg, 64)
  params = jax.jit(programs.init)().params
  float_cfg = dataclasses.replace(programs.model_cfg, kernel_format="float")
  graphdef, _, _ = model_lib.abstract_model(float_cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  np.testing.assert_allclose(
      model_lib.apply(programs.graphdef, params, tokens),
      model_lib.apply(graphdef, model_lib.as_float(params, jnp.float32), tokens),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [
    "adamw", pytest.param("subtrack", marks=pytest.mark.slow),
    pytest.param("apollo_mini", marks=pytest.mark.slow)])
def test_int8_layerwise_step_equals_a_float_reference_with_the_same_rounding(name):
  """The step differentiates the dequantized weights one layer at a time;
  the reference differentiates them all at once, runs the optimizer on the
  whole tree and rounds with the same keys (seed, step, layer)."""
  cfg = _small(name)
  programs = train.build_programs(cfg, 64)
  state = jax.jit(programs.init)()
  float_cfg = dataclasses.replace(programs.model_cfg, kernel_format="float")
  float_graphdef, _, _ = model_lib.abstract_model(float_cfg)
  update = precision.updater(cfg)

  @jax.jit
  def reference(state, batch):
    weights = model_lib.as_float(state.params, jnp.float32)
    loss, grads = jax.value_and_grad(train.loss_fn)(weights, float_graphdef, batch)
    updates, opt_state = programs.tx.update(grads, state.opt_state, weights)
    return train.TrainState(state.step + 1, update(state.params, updates, state.step),
                            opt_state), loss

  step = jax.jit(programs.train_step)
  for t in range(3):  # subspace refreshes at steps 0 and 2
    batch = jax.random.randint(jax.random.key(t), (4, 17), 0, 64)
    want, loss = reference(state, batch)
    state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["train/loss"], loss, rtol=1e-5)
    is_q = model_lib.is_quantized
    for a, b in zip(jax.tree.leaves(state.params, is_leaf=is_q),
                    jax.tree.leaves(want.params, is_leaf=is_q)):
      if not is_q(a):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        continue
      np.testing.assert_allclose(a.scales, b.scales, rtol=1e-5)
      # The two gradients differ in float32 summation order: a code whose
      # value lies within that of its rounding threshold may flip, by one.
      diff = np.abs(np.asarray(a.codes, int) - np.asarray(b.codes, int))
      assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    state = want._replace(params=state.params, opt_state=state.opt_state)


@pytest.mark.slow
def test_int8_resume_across_a_refresh_is_bit_exact(corpus, tmp_path):
  cfg = helpers.make_config(corpus, steps=7, checkpoint_every=2, eval_every=0,
                            opt__update_interval=3, opt__layerwise=True,
                            model__param_dtype="bfloat16", model__kernel_format="int8")
  straight = train.run(cfg, str(tmp_path / "straight"))
  cfg.stop_after = 4  # the checkpoint at 4, then refreshes at steps 3 and 6
  train.run(cfg, str(tmp_path / "split"))
  cfg.stop_after = 0
  resumed = train.run(cfg, str(tmp_path / "split"))
  kernel = resumed.state.params["blocks"]["mlp"]["up"]["kernel"]
  assert kernel.codes.dtype == jnp.int8 and kernel.scales.dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(straight.state))
  a, b = helpers.records(tmp_path / "straight"), helpers.records(tmp_path / "split")
  assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]
  # train.export writes the dequantized (bfloat16) kernels.
  out = export.export(str(tmp_path / "split"), str(tmp_path / "hf"))
  tensors = {}
  for f in os.listdir(out):
    if f.endswith(".safetensors"):
      tensors.update(safetensors.numpy.load_file(os.path.join(out, f)))
  up = tensors["model.layers.1.mlp.up_proj.weight"]  # (out, in)
  want = subspax.dequantize(jax.tree.map(lambda x: x[1], kernel)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(up, np.float32),
                                np.asarray(want, np.float32).T)


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "hf_llama")


def test_import_quantizes_and_export_dequantizes_a_hf_checkpoint(tmp_path):
  """`init_from` (read in float, `quantize_like`) then export (`as_float`,
  as `checkpoint.restore_params` does) and import again: the first import
  errs by at most half a level per block, the round trip by nothing."""
  cfg = model_lib.LlamaConfig(**hf.model_fields(hf.read_config(FIXTURE)), scan=True,
                              kernel_format="int8")
  _, shapes, _ = model_lib.abstract_model(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  float_shapes = model_lib.as_float(shapes, cfg.param_dtype)
  load = lambda d: hf.load_params(d, cfg, float_shapes,
                                  jax.tree.map(lambda _: device, float_shapes))
  weights = load(FIXTURE)
  params = model_lib.quantize_like(weights, shapes)
  kernel = params["blocks"]["attn"]["q"]["kernel"]
  assert kernel.codes.dtype == jnp.int8
  for q, w in ((kernel, weights["blocks"]["attn"]["q"]["kernel"]),
               (params["blocks"]["mlp"]["down"]["kernel"],
                weights["blocks"]["mlp"]["down"]["kernel"])):
    gap = _block_scales(w) / 127
    assert bool(jnp.all(jnp.abs(subspax.dequantize(q) - w) <= gap / 2 * (1 + 1e-5)))
  np.testing.assert_array_equal(params["head"]["kernel"], weights["head"]["kernel"])
  out = hf.save(str(tmp_path / "out"), model_lib.as_float(params, cfg.param_dtype), cfg,
                base_config=hf.read_config(FIXTURE))
  again = model_lib.quantize_like(load(out), shapes)
  jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.slow
def test_no_float_copy_of_the_kernels_exists():
  """Weights far larger than the activations (16 layers, one sequence of 8):
  the int8 step's temporaries stay those of the bfloat16 step, well below
  one bfloat16 copy of the kernels (CPU compiler)."""
  from train import dry_run  # pylint: disable=g-import-not-at-top
  records = {}
  for fmt in ("float", "int8"):
    cfg = helpers.make_config(
        {}, model__d_model=256, model__d_ff=768, model__n_layers=16,
        model__n_heads=4, opt__name="adamw", batch_size=1, seq_len=8, mesh__data=1,
        opt__layerwise=True, model__param_dtype="bfloat16", model__kernel_format=fmt)
    records[fmt] = dry_run.dry_run(cfg)
  kernels = 16 * (4 * 256 * 256 + 3 * 256 * 768)
  # 1 byte per kernel weight instead of 2, and a float32 scale per 256.
  assert (records["int8"]["param_bytes"]
          == records["float"]["param_bytes"] - kernels + 4 * kernels // 256)
  temps = {k: r["temp_bytes"] for k, r in records.items()}
  assert temps["int8"] < temps["float"] + 0.25 * 2 * kernels, (temps, 2 * kernels)


def test_int8_init_makes_one_layer_at_a_time_the_values_of_all_at_once():
  """The random init of int8 kernels quantizes each layer where it is made:
  the codes of quantizing the vmapped float stack, from the same draws (one
  level apart where one program rounds a draw to bfloat16 before quantizing
  and the other quantizes the float32 draw), and an init
  program whose temporaries stay below half a bfloat16 copy of the kernels
  (CPU compiler; 16 layers)."""
  cfg = _small(model__param_dtype="bfloat16")
  model_cfg = train.build_programs(cfg, 64).model_cfg
  params = jax.jit(lambda: model_lib.init_params(model_cfg, 0))()
  float_cfg = dataclasses.replace(model_cfg, kernel_format="float")
  floats = jax.jit(lambda: model_lib.init_params(float_cfg, 0))()
  want = model_lib.quantize_like(floats, params)
  for got, ref in zip(*(jax.tree.leaves(t, is_leaf=model_lib.is_quantized)
                        for t in (params, want))):
    if not model_lib.is_quantized(got):
      np.testing.assert_array_equal(got, ref)
      continue
    codes = np.abs(np.asarray(got.codes, int) - np.asarray(ref.codes, int))
    assert codes.max() <= 1 and codes.mean() < 0.1, codes.mean()
    np.testing.assert_allclose(got.scales, ref.scales, rtol=1e-2)

  big = dataclasses.replace(model_cfg, d_model=256, d_ff=768, n_layers=16,
                            n_heads=4)
  init = jax.jit(lambda: model_lib.init_params(big, 0)).lower().compile()
  kernels = 16 * (4 * 256 * 256 + 3 * 256 * 768)
  # All layers at once (nnx.vmap): 103 MB, 3.8x the bfloat16 kernels.
  assert init.memory_analysis().temp_size_in_bytes < 0.5 * 2 * kernels

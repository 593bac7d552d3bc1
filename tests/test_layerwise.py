"""Layer-wise updates: `subspax.layerwise` and the trainer's `opt.layerwise`.

A layer-wise step (each stacked layer updated as soon as its gradient exists)
must equal the ordinary step: the same parameters, optimizer state and
metrics, for every optimizer, including refresh steps and on a mesh.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspax
from train import optimizers
from train import train

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _params():
  """A projected leaf before the stack in flatten order ('a_embed'), a
  stacked kernel, a stacked norm and an unprojected head."""
  keys = jax.random.split(jax.random.key(0), 3)
  return {"a_embed": jax.random.normal(keys[0], (12, 10)),
          "blocks": {"kernel": jax.random.normal(keys[1], (3, 10, 12)),
                     "norm": jnp.ones((3, 10))},
          "head": jax.random.normal(keys[2], (10, 96))}


TRANSFORMATIONS = {
    "galore": lambda: subspax.galore(1e-2, rank=4, update_interval=2),
    "grassjump": lambda: subspax.grassjump(1e-2, rank=4, update_interval=2),
    "grass": lambda: subspax.grass(1e-2, rank=4, update_interval=2),
    "apollo": lambda: subspax.apollo(1e-2, rank=4, update_interval=2),
    "adamw": lambda: optax.adamw(optax.linear_schedule(1e-2, 0.0, 4),
                                 weight_decay=0.1),
}


def _layerwise_step(lw, grads, state, params):
  """One step through `lw`, the layers in a reverse `lax.scan` (as a
  backward pass runs them), under jit."""
  layers, rest = lw.split(grads)
  layer_params, rest_params = lw.split(params)

  def one(state, layer):
    take = lambda tree: jax.tree.map(lambda a: a[layer], tree)
    updates, state = lw.update_layer(take(layers), state, take(layer_params),
                                     layer)
    return state, updates

  state, stacked = jax.lax.scan(one, state, jnp.arange(3), reverse=True)
  updates, state = lw.update_rest(rest, state, rest_params)
  updates = jax.tree.map(lambda r, s: s if isinstance(r, optax.MaskedNode) else r,
                         updates, stacked,
                         is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return updates, state


@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_layer_by_layer_equals_one_update(name):
  tx = TRANSFORMATIONS[name]()
  params = _params()
  lw = subspax.layerwise(tx, params, {"a_embed": False, "blocks": True, "head": False})
  step = jax.jit(lambda g, s, p: _layerwise_step(lw, g, s, p))
  whole, split = tx.init(params), tx.init(params)
  p_whole = p_split = params
  for t in range(4):  # refreshes at steps 0 and 2
    grads = jax.tree.map(lambda p: jnp.sin((t + 1.0) * p), p_whole)
    updates, whole = jax.jit(tx.update)(grads, whole, p_whole)
    p_whole = optax.apply_updates(p_whole, updates)
    updates, split = step(jax.tree.map(lambda p: jnp.sin((t + 1.0) * p), p_split),
                          split, p_split)
    p_split = optax.apply_updates(p_split, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE),
               (p_split, split), (p_whole, whole))


def test_a_stack_routed_differently_per_layer_is_refused():
  params = {"blocks": {"scales": jnp.ones((12, 10))}}  # an L x D "matrix"
  with pytest.raises(ValueError, match="differs when the parameters are split"):
    lw = subspax.layerwise(subspax.galore(1e-2, rank=4), params, {"blocks": True})
    lw.update_layer({"blocks": {"scales": jnp.ones(10)}},
                    subspax.galore(1e-2, rank=4).init(params), None, 0)


def test_stacks_of_different_depths_are_refused():
  params = {"a": jnp.ones((3, 4, 4)), "b": jnp.ones((2, 4, 4))}
  with pytest.raises(ValueError, match="one leading layer axis"):
    subspax.layerwise(optax.adam(1e-2), params, True)


def _run_steps(cfg, steps, vocab=64):
  """`steps` train steps (with the layer modes' refreshes) on random tokens."""
  programs = train.build_programs(cfg, vocab)
  state = jax.jit(programs.init)()
  step = jax.jit(programs.train_step, donate_argnums=0)
  refresh = programs.refresh and jax.jit(programs.refresh, donate_argnums=0)
  metrics = []
  for t in range(steps):
    batch = jax.random.randint(jax.random.key(t), (cfg.batch_size, cfg.seq_len + 1),
                               0, vocab)
    if refresh and t % cfg.opt.update_interval == 0:
      state = refresh(state, batch)
    state, m = step(state, batch)
    metrics.append(m)
  return jax.device_get((state, metrics))


def _small_config(name, **overrides):
  return helpers.make_config({}, opt__name=name, opt__update_interval=2, seq_len=16,
                             batch_size=4, **overrides)


CASES = [(n, False) for n in optimizers.NAMES if n != "optax_galore"] + [
    ("grass", True), ("rso", True)]


@pytest.mark.slow
@pytest.mark.parametrize("name, subspace_layers", CASES)
def test_layerwise_step_equals_the_ordinary_step(name, subspace_layers):
  cfg = _small_config(name, opt__subspace_layers=subspace_layers)
  ordinary = _run_steps(cfg, 3)  # a refresh at steps 0 and 2
  cfg.opt.layerwise = True
  layerwise = _run_steps(cfg, 3)
  # Fira's norm-growth limiter rescales a whole matrix when the residual's
  # norm crosses its bound, which float32 summation order can move by a hair.
  tolerance = dict(TOLERANCE, atol=3e-5) if name == "fira" else TOLERANCE
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance),
               layerwise, ordinary)


def test_layerwise_step_equals_the_ordinary_step_with_blockwise_attention():
  """The layer-wise backward scan recomputes each block's blockwise attention:
  several blocks of 6 positions (16 = 6 + 6 + 4), grouped queries."""
  cfg = _small_config("adamw", model__attention="blockwise",
                      model__attention_block=6, model__n_kv_heads=2)
  ordinary = _run_steps(cfg, 2)
  cfg.opt.layerwise = True
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE),
               _run_steps(cfg, 2), ordinary)


def test_layerwise_step_equals_the_ordinary_step_on_a_mesh():
  assert jax.device_count() == 8
  cfg = _small_config("galore", mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  mesh, rules, _ = train.check_and_mesh(cfg)
  results = []
  for layerwise in (False, True):
    cfg.opt.layerwise = layerwise
    programs = train.build_programs(cfg, 64)
    shardings = train.train_state_shardings(programs, mesh, rules)
    with jax.set_mesh(mesh):
      state = jax.jit(programs.init, out_shardings=shardings)()
      jitted = train.jit_programs(programs, shardings, mesh, cfg)
      for t in range(3):
        batch = jax.device_put(
            jax.random.randint(jax.random.key(t), (4, 17), 0, 64), jitted.batch.sharding)
        state, metrics = jitted.train_step(state, batch)
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert not kernel.sharding.is_fully_replicated
    results.append(jax.device_get((state, metrics)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), *results)


def test_micro_batches_average_to_the_whole_batch():
  whole = _run_steps(_small_config("subtrack"), 1)
  parts = _run_steps(_small_config("subtrack", grad_accum=2), 1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               parts, whole)


def test_clipping_scales_the_gradient_before_the_update():
  # Adam's first step is about g / (|g| + eps): a gradient clipped far below
  # eps barely moves the weights; the metric is the norm before clipping.
  start = jax.device_get(jax.jit(train.build_programs(_small_config("adamw"), 64).init)())
  moved = {}
  for clip in (0.0, 1e-12):
    state, metrics = _run_steps(_small_config(
        "adamw", opt__clip_norm=clip, opt__warmup_steps=0), 1)
    moved[clip] = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), state.params, start.params)))
    assert metrics[0]["train/grad_norm"] > 0.1
  assert moved[1e-12] < 1e-3 * moved[0.0], moved


@pytest.mark.slow
def test_layerwise_bf16_resume_across_a_refresh_is_bit_exact(corpus, tmp_path):
  cfg = helpers.make_config(corpus, steps=7, checkpoint_every=2, eval_every=0,
                            opt__update_interval=3, opt__layerwise=True,
                            model__param_dtype="bfloat16")
  straight = train.run(cfg, str(tmp_path / "straight"))
  cfg.stop_after = 4  # the checkpoint at 4, then refreshes at steps 3 and 6
  train.run(cfg, str(tmp_path / "split"))
  cfg.stop_after = 0
  resumed = train.run(cfg, str(tmp_path / "split"))
  assert resumed.state.params["blocks"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(straight.state))
  a, b = helpers.records(tmp_path / "straight"), helpers.records(tmp_path / "split")
  assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]


def test_layerwise_bf16_step_rounds_like_the_ordinary_step():
  """Stochastic rounding draws the same bits layer by layer: the bfloat16
  weights agree to a rounding step (the two steps' bfloat16 gradients differ
  in their last bits, so some roundings flip)."""
  cfg = _small_config("subtrack", model__param_dtype="bfloat16")
  ordinary = _run_steps(cfg, 1)
  cfg.opt.layerwise = True
  layerwise = _run_steps(cfg, 1)
  for a, b in zip(jax.tree.leaves(layerwise[0].params),
                  jax.tree.leaves(ordinary[0].params)):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-4)  # lr 1e-2

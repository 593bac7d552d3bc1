"""Micro-batches accumulated in the reduced space (`grad_accum` with
`opt.layerwise=True`, train/layerwise.py's `make_accumulating_step`; the
library's `subspax.reduce_gradients` and friends).

The layer-wise step with `grad_accum=k` must equal the ordinary step with
`grad_accum=k` for every method whose update reads only the reduced gradient,
given the same subspaces: on a refresh step both refresh from the first
micro-batch's gradient here (the ordinary step's own refresh reads the whole
batch's; docs/trainer.md measures that difference).
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspax
from train import model as model_lib
from train import train

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB = 64


def _config(name, **overrides):
  overrides = {"opt__update_interval": 2, "seq_len": 16, "batch_size": 6,
               "grad_accum": 3, **overrides}
  return helpers.make_config({}, opt__name=name, **overrides)


def _batch(cfg, t):
  return jax.random.randint(jax.random.key(t), (cfg.batch_size, cfg.seq_len + 1),
                            0, VOCAB)


def _steps(programs):
  """(ordinary, refresh) step programs, as the trainer picks them."""
  if programs.ordinary_step is None:
    step = jax.jit(programs.train_step)
    return step, step
  return jax.jit(programs.ordinary_step), jax.jit(programs.refresh_step)


def _refresh_from_first_micro_batch(programs, cfg, state, batch):
  """The ordinary step's state with its subspaces refreshed from micro-batch 0
  (the layer-wise step's refresh), before an ordinary step."""
  trainable, frozen = model_lib.partition(
      programs.graphdef, state.params, model_lib.TRAINABLE, ...)
  first = batch[::cfg.grad_accum]
  grads = jax.grad(lambda p: train.loss_fn(model_lib.combine(p, frozen),
                                           programs.graphdef, first))(trainable)
  opt_state = subspax.refresh_subspaces(programs.tx, grads, state.opt_state,
                                        trainable, refresh=True)
  return state._replace(opt_state=opt_state)


def _run(cfg, steps, layerwise):
  cfg.opt.layerwise = layerwise
  programs = train.build_programs(cfg, VOCAB)
  state = jax.jit(programs.init)()
  ordinary, refreshing = _steps(programs)
  refresh = jax.jit(lambda s, b: _refresh_from_first_micro_batch(programs, cfg, s, b))
  # The subspace-layer modes' refresh program: the layer-wise one reads the
  # first micro-batch itself.
  layers_refresh = programs.refresh and jax.jit(programs.refresh)
  metrics = []
  for t in range(steps):
    batch = _batch(cfg, t)
    is_refresh = train.is_refresh_step(t + 1, cfg.opt.update_interval)
    if layers_refresh and is_refresh:
      state = layers_refresh(state, batch if layerwise else batch[::cfg.grad_accum])
    if layerwise:
      state, m = (refreshing if is_refresh else ordinary)(state, batch)
    else:
      if is_refresh and programs.ordinary_step is not None:
        state = refresh(state, batch)
      state, m = ordinary(state, batch)
    metrics.append(m)
  return jax.device_get((state, metrics))


EXACT = {
    "galore": {},
    "subtrack": {"opt__subtrack__recovery": False},
    "grasswalk": {"opt__grasswalk__recovery": False},
    "grassjump": {"opt__grassjump__recovery": False},
    "rso": {},
    "grass": {},
    "adamw": {},
    "grass_layers": {"opt__name": "grass", "opt__subspace_layers": True},
    "rso_layers": {"opt__name": "rso", "opt__subspace_layers": True},
}
FAST = ("galore",)


@pytest.mark.parametrize("name", [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXACT])
def test_layerwise_accumulation_equals_the_ordinary_accumulation(name):
  cfg = _config(EXACT[name].get("opt__name", name),
                **{k: v for k, v in EXACT[name].items() if k != "opt__name"})
  ordinary = _run(cfg, 3, layerwise=False)  # refreshes at steps 1 and 3
  layerwise = _run(cfg, 3, layerwise=True)
  (state_o, metrics_o), (state_l, metrics_l) = ordinary, layerwise
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE),
               state_l, state_o)
  for m_l, m_o in zip(metrics_l, metrics_o):
    for key in ("train/loss", "lr"):
      np.testing.assert_allclose(m_l[key], m_o[key], **TOLERANCE)
  assert int(state_l.step) == 3


def test_one_step_count_and_schedule_step_per_batch():
  """k micro-batches make one optimizer step: the counts and the learning rate
  advance once per batch (the schedule warms up over the first steps)."""
  cfg = _config("galore", opt__warmup_steps=4, grad_accum=3)
  state, metrics = _run(cfg, 2, layerwise=True)
  counts = {int(c) for c in jax.tree.leaves(state.opt_state)
            if np.ndim(c) == 0 and np.issubdtype(np.asarray(c).dtype, np.integer)}
  assert counts == {2}, counts
  lr = train.build_programs(cfg, VOCAB).lr
  assert [float(m["lr"]) for m in metrics] == [float(lr(0)), float(lr(1))]
  assert float(metrics[1]["lr"]) > float(metrics[0]["lr"]) >= 0
  assert int(state.step) == 2


def test_accumulators_are_reduced_size():
  """The blocks' accumulators: one `(r, D)` per projected matrix (the size of
  its first moment), the gradient's size for every other leaf."""
  from train import layerwise  # pylint: disable=g-import-not-at-top
  cfg = _config("galore", opt__rank=4)
  programs = train.build_programs(cfg, VOCAB)
  state = jax.eval_shape(programs.init)
  sizes = layerwise.accumulator_bytes(programs.graphdef, programs.tx,
                                      programs.param_shapes, state.opt_state)
  projected = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, subspax.ProjectedState))
               if isinstance(s, subspax.ProjectedState)]
  assert projected
  assert sizes["reduced"] == sum(s.mu.size * 4 for s in projected)
  trainable = model_lib.trainable(programs.graphdef, programs.param_shapes)
  total = sum(v.size * 4 for v in jax.tree.leaves(trainable))
  full_projected = sum(s.layout.num_matrices * s.layout.d * s.layout.D * 4
                       for s in projected)
  assert sizes["full"] == total - full_projected
  assert sizes["reduced"] <= full_projected * 4 // 8  # rank 4 of d >= 8


def test_layerwise_accumulation_on_a_mesh_equals_one_device():
  """On a data x fsdp x tensor mesh each micro-batch's reduced gradient is
  reduced across devices inside the scan; the result is the one device's."""
  assert jax.device_count() == 8
  cfg = _config("galore", batch_size=8, grad_accum=2)
  single = _run(cfg, 2, layerwise=True)
  cfg = _config("galore", batch_size=8, grad_accum=2, mesh__data=2, mesh__fsdp=2,
                mesh__tensor=2, opt__layerwise=True)
  mesh, rules, tx = train.check_and_mesh(cfg)
  programs = train.build_programs(cfg, VOCAB, tx)
  shardings = train.train_state_shardings(programs, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(programs.init, out_shardings=shardings)()
    jitted = train.jit_programs(programs, shardings, mesh, cfg)
    metrics = []
    for t in range(2):
      step = jitted.refresh_step if t == 0 else jitted.train_step
      batch = jax.device_put(_batch(cfg, t), jitted.batch.sharding)
      state, m = step(state, batch)
      metrics.append(m)
  kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE),
               jax.device_get((state, metrics)), single)


@pytest.mark.slow
def test_layerwise_accumulation_resume_is_bit_exact(corpus, tmp_path):
  cfg = helpers.make_config(corpus, steps=5, checkpoint_every=2, eval_every=0,
                            opt__update_interval=2, opt__layerwise=True,
                            grad_accum=4, opt__subtrack__recovery=False,
                            model__param_dtype="bfloat16")
  # The checkpoint at 2, then a refresh at step 3.
  helpers.assert_resume_is_bit_exact(cfg, tmp_path, stop_after=2)

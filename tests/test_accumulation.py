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
  metrics = []
  for t in range(steps):
    batch = _batch(cfg, t)
    is_refresh = train.is_refresh_step(t + 1, cfg.opt.update_interval)
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
}
FAST = ("galore", "grass")


@pytest.mark.parametrize("name", [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXACT])
def test_layerwise_accumulation_equals_the_ordinary_accumulation(name):
  cfg = _config(name, **EXACT[name])
  ordinary = _run(cfg, 3, layerwise=False)  # refreshes at steps 1 and 3
  layerwise = _run(cfg, 3, layerwise=True)
  (state_o, metrics_o), (state_l, metrics_l) = ordinary, layerwise
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE),
               state_l, state_o)
  for m_l, m_o in zip(metrics_l, metrics_o):
    for key in ("train/loss", "lr"):
      np.testing.assert_allclose(m_l[key], m_o[key], **TOLERANCE)
  assert int(state_l.step) == 3

"""Every trainer option that changes the math, checked directly.

Each test fails if its option is ignored or inverted: the learning-rate
schedule against its closed form and optax's, weight decay and
`opt.decay_matrices_only` on zero gradients, Adam's `b1`, `b2` and `eps`
(placed after the bias correction) on two steps, the options of every method
section `opt.<name>` on their way to the factory, and the model's
`rope_theta`, `norm_eps`, `init_std` and compute `dtype`.
"""

import math
import types

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import subspax
from configs import base as config_base
from train import errors
from train import model as model_lib
from train import optimizers

# Trainer optimizers, as configured by name (apollo_mini is rank 1).
NAMES = ("adamw", *subspax.METHODS)


def _opt(**fields):
  """The base config's `opt` section with `fields` set."""
  opt = config_base.get_base_config().opt
  opt.update({"rank": 4, "update_interval": 10, "warmup_steps": 0, **fields})
  return opt


def _params(key=0):
  """A trainer-like tree: a projected block kernel, a 1-D norm scale."""
  k1, k2 = jax.random.split(jax.random.key(key))
  return {"blocks": {"kernel": jax.random.normal(k1, (32, 48))},
          "norm": {"scale": 1.0 + jax.random.uniform(k2, (32,))}}


# --- The learning-rate schedule ----------------------------------------------


def _closed_form(t, peak, warmup, steps, ratio):
  """Linear warmup from 0 to `peak` over `warmup` steps, then a half cosine
  to `ratio * peak` at step `steps`."""
  if t < warmup:
    return peak * t / warmup
  progress = min(t - warmup, steps - warmup) / (steps - warmup)
  end = ratio * peak
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("steps,fields,warmup", [
    (10_000, dict(warmup_steps=100), 100),
    (5_000, dict(warmup_steps=-1, warmup_fraction=0.02), 100),
    (20_000, dict(warmup_steps=500, min_lr_ratio=0.0), 500),
    (3_000, dict(warmup_steps=3_000, warmup_fraction=0.1), 300),
])
def test_schedule_matches_its_closed_form_and_optax(steps, fields, warmup):
  """Peak at the end of warmup, `min_lr_ratio` x peak at the horizon (the
  run's `steps`), the cosine in between, for runs much longer than their
  warmup; the same values as `optax.warmup_cosine_decay_schedule`."""
  opt = _opt(**{"learning_rate": 2e-3, "min_lr_ratio": 0.25, **fields})
  assert optimizers.warmup_steps(opt, steps) == warmup
  lr = optimizers.schedule(opt, steps)
  reference = optax.warmup_cosine_decay_schedule(
      0.0, 2e-3, warmup, decay_steps=steps, end_value=2e-3 * opt.min_lr_ratio)
  ts = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1,
               (warmup + steps) // 2, steps - 1, steps,
               *range(0, steps + 1, 97)})
  got = np.asarray([float(lr(t)) for t in ts])
  want = np.asarray([_closed_form(t, 2e-3, warmup, steps, opt.min_lr_ratio)
                     for t in ts])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)
  np.testing.assert_allclose(got, [float(reference(t)) for t in ts],
                             rtol=1e-6, atol=1e-12)
  assert float(lr(warmup)) == pytest.approx(2e-3, rel=1e-6)
  assert float(lr(steps)) == pytest.approx(2e-3 * opt.min_lr_ratio, rel=1e-6,
                                           abs=1e-12)
  assert np.all(np.diff(got[np.asarray(ts) >= warmup]) <= 1e-12)


# --- Weight decay ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("matrices_only", [False, True])
def test_weight_decay_on_zero_gradients(name, matrices_only):
  """Zero gradients leave only the decay: kernels shrink by lr x wd, and the
  norms' scales shrink too unless `opt.decay_matrices_only`."""
  lr, wd = 1e-2, 0.5
  opt = _opt(name=name, learning_rate=lr, weight_decay=wd,
             decay_matrices_only=matrices_only)
  tx = optimizers.build(opt, steps=100, seed=0)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["blocks"]["kernel"],
                             -lr * wd * params["blocks"]["kernel"], rtol=1e-5)
  scale = params["norm"]["scale"]
  np.testing.assert_allclose(updates["norm"]["scale"],
                             0 * scale if matrices_only else -lr * wd * scale,
                             rtol=1e-5)


# --- Adam's b1, b2 and eps ---------------------------------------------------


def _adam_two_steps(g1, g2, lr, b1, b2, eps):
  """optax's Adam (eps added to sqrt(nu_hat), after the bias correction)."""
  mu = (1 - b1) * g1
  nu = (1 - b2) * g1**2
  first = -lr * (mu / (1 - b1)) / (np.sqrt(nu / (1 - b2)) + eps)
  mu = b1 * mu + (1 - b1) * g2
  nu = b2 * nu + (1 - b2) * g2**2
  second = -lr * (mu / (1 - b1**2)) / (np.sqrt(nu / (1 - b2**2)) + eps)
  return first, second


@pytest.mark.parametrize("name", NAMES)
def test_adam_b1_b2_and_eps_reach_every_optimizer(name):
  """Two steps on the 1-D scale (every method's Adam part) equal Adam's
  closed form with opt.b1, opt.b2 and a large opt.eps, added to
  sqrt(nu_hat) after the bias correction (galore-torch's placement, before
  it, would be eps / sqrt(1 - b2^t))."""
  lr, b1, b2, eps = 1e-2, 0.5, 0.7, 0.3
  opt = _opt(name=name, learning_rate=lr, b1=b1, b2=b2, eps=eps)
  tx = optimizers.build(opt, steps=100, seed=0)
  params = _params()
  g1, g2 = _params(1), _params(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u1, state = step(g1, state, params)
  u2, state = step(g2, state, params)
  want = _adam_two_steps(np.asarray(g1["norm"]["scale"]),
                         np.asarray(g2["norm"]["scale"]), lr, b1, b2, eps)
  decayed = float(optimizers.schedule(opt, 100)(1)) / lr  # the cosine's step 1
  np.testing.assert_allclose(u1["norm"]["scale"], want[0], rtol=1e-5)
  np.testing.assert_allclose(u2["norm"]["scale"], decayed * want[1],
                             rtol=1e-5)


def test_galore_projected_step_uses_eps_after_the_bias_correction():
  """GaLore's projected first step: ``-lr * alpha * S (R / (|R| + eps))``,
  ``R = S^T G``, with the basis the step chose."""
  lr, eps = 1e-2, 0.3
  opt = _opt(name="galore", learning_rate=lr, eps=eps)
  tx = optimizers.build(opt, steps=100, seed=0)
  params = _params()
  g = _params(1)
  updates, state = jax.jit(tx.update)(g, tx.init(params), params)
  leaf = jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, subspax.ProjectedState))
  s = [x for x in leaf if isinstance(x, subspax.ProjectedState)][0].basis.s
  reduced = s.T @ g["blocks"]["kernel"]
  alpha = optimizers.method_kwargs(opt)["scale"]
  want = -lr * alpha * s @ (reduced / (jnp.abs(reduced) + eps))
  np.testing.assert_allclose(updates["blocks"]["kernel"], want, rtol=1e-4,
                             atol=1e-7)


# --- AdamW's opt.block_lr_scale ----------------------------------------------


def _trainer_params():
  """A projected block kernel, a 1-D norm scale and an embedding."""
  params = _params()
  params["embed"] = {"embedding": jax.random.normal(jax.random.key(3), (64, 32))}
  return params


@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_block_lr_scale_scales_adamws_step_of_the_projected_kernels_only(scale):
  """One step from zero moments: the block kernel moves `scale` x as far as
  without the option, the embedding and the norm exactly as far; the weight
  decay stays at the learning rate (as in the subspax methods)."""
  lr, wd = 1e-2, 0.1
  params, grads = _trainer_params(), _params(1)
  grads["embed"] = {"embedding": jnp.ones((64, 32))}
  step = {}
  for s in (1.0, scale):
    tx = optimizers.build(_opt(name="adamw", learning_rate=lr, weight_decay=wd,
                               block_lr_scale=s), steps=100, seed=0)
    step[s] = jax.jit(tx.update)(grads, tx.init(params), params)[0]
  decay = lambda path: -lr * wd * params[path[0]][path[1]]
  kernel = ("blocks", "kernel")
  np.testing.assert_allclose(
      step[scale]["blocks"]["kernel"] - decay(kernel),
      scale * (step[1.0]["blocks"]["kernel"] - decay(kernel)), rtol=1e-5)
  for outer, inner in (("norm", "scale"), ("embed", "embedding")):
    np.testing.assert_array_equal(step[scale][outer][inner], step[1.0][outer][inner])
  assert not np.allclose(step[scale]["blocks"]["kernel"],
                         step[1.0]["blocks"]["kernel"])


def test_block_lr_scale_follows_opt_projected():
  """With `opt.projected`, the factor goes to the kernels it names."""
  params = {"blocks": {"attn": {"kernel": jnp.ones((32, 48))},
                       "mlp": {"kernel": jnp.ones((32, 48))}}}
  tx = optimizers.build(_opt(name="adamw", learning_rate=1.0, projected="mlp",
                             block_lr_scale=0.5), steps=100, seed=0)
  updates = tx.update(params, tx.init(params), params)[0]["blocks"]
  np.testing.assert_allclose(updates["attn"]["kernel"], -1.0, rtol=1e-5)
  np.testing.assert_allclose(updates["mlp"]["kernel"], -0.5, rtol=1e-5)


@pytest.mark.parametrize("name, value, message", [
    ("adamw", 0.0, "opt.block_lr_scale must be a positive number, got 0.0"),
    ("adamw", -1.0, "opt.block_lr_scale must be a positive number, got -1.0"),
    ("adamw", True, "opt.block_lr_scale must be a positive number, got True"),
    ("subtrack", 0.25, "opt.block_lr_scale=0.25 applies to opt.name='adamw' "
     "only; opt.name='subtrack' scales its projected kernels by "
     "opt.subtrack.scale"),
])
def test_a_bad_block_lr_scale_is_one_line(name, value, message):
  opt = _opt(name=name).to_dict()
  opt["block_lr_scale"] = value  # a preset may write any value
  model_cfg = model_lib.LlamaConfig(**TINY)
  with pytest.raises(errors.UserError, match=message) as error:
    optimizers.validate(ml_collections.ConfigDict(opt), model_cfg, 10)
  assert "\n" not in str(error.value)


# --- The method sections opt.<name> ------------------------------------------


def _other(option: config_base.Option):
  """A value of the option's type other than its default."""
  if option.choices:
    return next(c for c in option.choices if c != option.default)
  if option.field_type is bool:
    return not option.default
  if option.field_type is str:
    return option.default + "x"
  return (option.default or 0) * 2 + 3


@pytest.mark.parametrize("name", sorted(subspax.METHODS))
def test_every_method_option_reaches_its_factory(name, monkeypatch):
  """`build` passes each `opt.<name>.<option>` (set to a non-default value),
  and opt.rank, opt.update_interval, b1, b2, eps, to `subspax.<name>`."""
  seen = {}

  def factory(learning_rate, **kwargs):
    del learning_rate
    seen.update(kwargs)
    return optax.identity()

  monkeypatch.setattr(optimizers, "subspax", types.SimpleNamespace(
      METHODS={name: factory}, with_moment_dtype=lambda tx, dtype: tx))
  options = config_base.options(name)
  values = {key: _other(option) for key, option in options.items()}
  opt = _opt(name=name, rank=5, update_interval=7, b1=0.5, b2=0.6, eps=0.7)
  opt[name].update(values)
  optimizers.build(opt, steps=100, seed=0)
  assert {key: seen[key] for key in values} == values
  assert seen["rank"] == optimizers.method_rank(name, 5)
  assert (seen["update_interval"], seen["b1"], seen["b2"], seen["eps"]) == (
      7, 0.5, 0.6, 0.7)


# --- The model ---------------------------------------------------------------

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
            head_dim=8, d_ff=64)


def _logits(**overrides):
  cfg = model_lib.LlamaConfig(**{**TINY, **overrides})
  graphdef, _, _ = model_lib.abstract_model(cfg)
  params = model_lib.init_params(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY["vocab_size"])
  return params, model_lib.apply(graphdef, params, tokens)


def test_rotary_rotates_by_position_times_theta_powers():
  """Pair ``(x_i, x_{i + H/2})`` at position ``p`` turns by
  ``p * theta^(-i / (H/2))`` (rope_theta = 500, not the default)."""
  theta, h = 500.0, 8
  x = jax.random.normal(jax.random.key(1), (1, 6, 2, h))
  out = np.asarray(model_lib.rotary(x, theta))
  x = np.asarray(x)
  for p in range(6):
    for i in range(h // 2):
      angle = p * theta ** (-i / (h // 2))
      c, s = math.cos(angle), math.sin(angle)
      a, b = x[0, p, :, i], x[0, p, :, i + h // 2]
      np.testing.assert_allclose(out[0, p, :, i], a * c - b * s, atol=1e-5)
      np.testing.assert_allclose(out[0, p, :, i + h // 2], b * c + a * s,
                                 atol=1e-5)


def test_model_reads_rope_theta_norm_eps_and_dtype():
  """Each option changes the logits (an ignored one would not); bfloat16
  compute stays close to float32."""
  _, base = _logits()
  for overrides in (dict(rope_theta=50.0), dict(norm_eps=1.0),
                    dict(dtype=jnp.bfloat16)):
    _, other = _logits(**overrides)
    assert float(jnp.max(jnp.abs(other - base))) > 1e-3, overrides
  _, bf16 = _logits(dtype=jnp.bfloat16)
  assert float(jnp.max(jnp.abs(bf16 - base))) < 0.1 * float(
      jnp.max(jnp.abs(base)))


def test_rms_norm_adds_norm_eps_to_the_mean_square():
  cfg = model_lib.LlamaConfig(**TINY, norm_eps=0.5)
  with nnx.use_eager_sharding(False):
    norm = model_lib._rms_norm(cfg, nnx.Rngs(0))  # pylint: disable=protected-access
  x = jax.random.normal(jax.random.key(2), (3, TINY["d_model"]))
  want = x / jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 0.5)
  np.testing.assert_allclose(norm(x), want, rtol=1e-5)


@pytest.mark.parametrize("init_std", [0.02, 0.1])
def test_init_std_sets_the_std_of_every_weight_matrix(init_std):
  params, _ = _logits(init_std=init_std)
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    if w.ndim >= 2:
      assert abs(float(jnp.std(w)) / init_std - 1) < 0.15, (path, init_std)

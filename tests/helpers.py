"""Shared test helpers: the method table, small problems, trainer configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspax

# Every method (and notable variant) the generic checks run over.
METHODS = {
    "galore": (subspax.galore, {}),
    "subtrack": (subspax.subtrack, {}),
    "grasswalk": (subspax.grasswalk, {}),
    "grasswalk_hybrid": (subspax.grasswalk, {"jump_prob": 0.3}),
    "grassjump": (subspax.grassjump, {}),
    "grassjump_keyed": (subspax.grassjump, {"store_basis": False}),
    "rso": (subspax.rso, {}),
    "rso_gaussian": (subspax.rso, {"orthonormal": False}),
    "grass": (subspax.grass, {}),
    "grass_topk_overlap": (subspax.grass, {"selection": "topk",
                                           "keep_overlap": True}),
    "grass_uniform_replacement": (subspax.grass, {"selection": "uniform",
                                                  "replacement": True}),
    "fira": (subspax.fira, {}),
    "apollo": (subspax.apollo, {}),
    "apollo_tensor_stored": (subspax.apollo, {"scale_type": "tensor",
                                              "store_basis": True}),
    "apollo_mini": (subspax.apollo_mini, {}),
}


# The main variant of each method: the heavier generic checks run over these.
CORE = ("galore", "subtrack", "grasswalk", "grassjump", "grassjump_keyed",
        "rso", "grass", "fira", "apollo", "apollo_mini")


def make_tx(name, learning_rate=1e-2, rank=4, update_interval=5, **extra):
  factory, kwargs = METHODS[name]
  return factory(learning_rate, rank=rank, update_interval=update_interval,
                 **{**kwargs, **extra})


def random_params(key, dtype=jnp.float32):
  """A small parameter tree: a wide and a tall matrix, a stack, a bias."""
  keys = jax.random.split(key, 3)
  return {
      "tall": jax.random.normal(keys[0], (20, 10), dtype),  # right side
      "stack": jax.random.normal(keys[1], (3, 12, 16), dtype),  # left side
      "bias": jax.random.normal(keys[2], (16,), dtype),
  }


def least_squares_problem(key, m=32, n=24, k=64):
  """``min_W ||X W - Y||^2`` with a planted low-rank-plus-noise solution."""
  kx, kw, kn = jax.random.split(key, 3)
  x = jax.random.normal(kx, (k, m))
  w_true = jax.random.normal(kw, (m, 4)) @ jax.random.normal(kn, (4, n))
  y = x @ w_true

  def loss(params):
    return jnp.mean(jnp.square(x @ params["w"] - y))

  return loss, {"w": jnp.zeros((m, n))}


def run(tx, loss, params, steps):
  """Runs ``steps`` jitted optimizer steps; returns (params, losses)."""
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, np.array(losses)


def make_config(corpus, **overrides):
  """The test preset (configs/test.py) on the generated corpus fixture.

  `a__b=v` sets field `a.b`.
  """
  from configs import test as test_preset  # pylint: disable=g-import-not-at-top
  cfg = test_preset.get_config()
  flat = {**corpus, **{k.replace("__", "."): v for k, v in overrides.items()}}
  cfg.update_from_flattened_dict(flat)
  return cfg


def records(workdir):
  """The metrics.jsonl records of a run, by step."""
  from train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  return {r["step"]: r for r in metrics_lib.read(str(workdir))}


def assert_resume_is_bit_exact(cfg, tmp_path, stop_after: int):
  """Runs ``cfg`` straight, then stopped after ``stop_after`` steps and
  resumed; asserts the same final state and losses. Returns the straight
  run and its records."""
  from train import train  # pylint: disable=g-import-not-at-top
  straight = train.run(cfg, str(tmp_path / "straight"))
  cfg.stop_after = stop_after
  train.run(cfg, str(tmp_path / "split"))
  cfg.stop_after = 0
  resumed = train.run(cfg, str(tmp_path / "split"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(straight.state))
  a, b = records(tmp_path / "straight"), records(tmp_path / "split")
  assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]
  return straight, a


def decaying_spectrum(key, d, big_d, decay=0.8):
  """A random ``(d, D)`` matrix with singular values ``decay**k``, like gradients."""
  from subspax import _linalg  # pylint: disable=g-import-not-at-top
  ku, kv = jax.random.split(key)
  k = min(d, big_d)
  u = _linalg.haar_basis(ku, d, k)
  v = _linalg.haar_basis(kv, big_d, k)
  return (u * decay ** jnp.arange(k)) @ v.T


def projection_sq_error(s, g):
  """``||G - S S^T G||_F^2``."""
  return jnp.sum(jnp.square(g - s @ (s.T @ g)))


class ReplayedSubspace(subspax.SubspacePolicy):
  """Replays recorded bases in order (refresh k returns ``bases[k]``).

  The reference packages draw their random projections with torch's RNG and
  take their SVDs with arbitrary signs; replaying their bases makes the
  remaining update rule comparable step for step.
  """

  def __init__(self, bases):
    self.bases = jnp.asarray(bases)

  def refresh(self, basis, g, key, r):
    del g, key, r
    dist = jnp.sum(jnp.square(self.bases - basis.s), axis=(1, 2))
    following = jnp.where(jnp.min(dist) < 1e-12, jnp.argmin(dist) + 1, 0)
    return subspax.DenseBasis(
        self.bases[jnp.minimum(following, len(self.bases) - 1)])

"""GRASS sparse-gradient and RSO reparametrised modes (subspax.reparam, train/reparam.py).

The layer identities are closed-form; the trainer modes are checked against
the plain `subspax.grass` / `subspax.rso` transformations on the same model,
data and keys, for their memory and FLOPs against the plain step, and for
bit-exact resume across a refresh / merge boundary.
"""

import math
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import helpers
import subspax
from bench import reparam as bench_reparam
from train import checkpoint as checkpoint_lib
from train import hf
from train import memory as train_memory
from train import model as model_lib
from train import reparam
from train import sharding as sharding_lib
from train import train

def _basis(kind, key, d, r):
  if kind == "rows":
    index = jax.random.choice(key, d, (r,), replace=False).astype(jnp.int32)
    return subspax.RowBasis(index, jax.random.uniform(key, (r,), minval=0.5,
                                                      maxval=2.0))
  return subspax.DenseBasis(jax.random.normal(key, (d, r)))


@hypothesis.settings(deadline=None, max_examples=12)
@hypothesis.given(m=st.integers(3, 9), n=st.integers(3, 9),
                  kind=st.sampled_from(["rows", "dense"]),
                  side=st.sampled_from(["left", "right"]), seed=st.integers(0, 99))
def test_layer_is_the_merged_kernel_and_its_delta_gradient_is_the_reduced_one(
    m, n, kind, side, seed):
  keys = jax.random.split(jax.random.key(seed), 5)
  d = m if side == "left" else n
  r = min(2, d)
  x = jax.random.normal(keys[0], (4, 5, m))
  w = jax.random.normal(keys[1], (m, n))
  delta = jax.random.normal(keys[2], subspax.reparam.delta_shape(m, n, r, side))
  basis = _basis(kind, keys[3], d, r)
  dy = jax.random.normal(keys[4], (4, 5, n))

  y = subspax.reparam.dense(x, w, delta, basis, side=side)
  merged = subspax.reparam.merge(w, delta, basis, side=side)
  np.testing.assert_allclose(y, x @ merged, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      subspax.reparam.merge(w, jnp.zeros_like(delta), basis, side=side), w)

  # At Delta = 0, dL/dDelta is the reduced gradient project(G) of the kernel.
  grad_delta = jax.grad(lambda dl: jnp.sum(
      subspax.reparam.dense(x, w, dl, basis, side=side) * dy))(jnp.zeros_like(delta))
  g = jnp.einsum("blm,bln->mn", x, dy)
  reduced = basis.project(subspax.reparam.canonical(g, side))
  np.testing.assert_allclose(grad_delta, reduced, rtol=1e-4, atol=1e-4)

  # dx goes through the effective kernel; the frozen kernel gets no gradient.
  grad_x, grad_w = jax.grad(lambda x_, w_: jnp.sum(
      subspax.reparam.dense(x_, w_, delta, basis, side=side) * dy), (0, 1))(x, w)
  np.testing.assert_allclose(grad_x, dy @ merged.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(grad_w, jnp.zeros_like(w))


def test_side_resolution_and_delta_shapes():
  assert subspax.reparam.resolve_side(4, 4) == "left"
  assert subspax.reparam.resolve_side(8, 4) == "right"
  assert subspax.reparam.delta_shape(8, 4, 2, "auto") == (2, 8)
  assert subspax.reparam.delta_shape(8, 4, 2, "left") == (2, 4)
  with pytest.raises(ValueError, match="side"):
    subspax.reparam.resolve_side(4, 4, "top")


def _stacked_basis(kind, key, lead, d, r):
  keys = jax.random.split(key, math.prod(lead))
  basis = jax.vmap(lambda k: _basis(kind, k, d, r))(keys)
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), basis)


@pytest.mark.parametrize("kind", ["rows", "dense"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_merge_layers_folds_each_stacked_delta_into_its_kernel(kind, side):
  lead, m, n, r = (2, 3), 5, 4, 2
  d = m if side == "left" else n
  keys = jax.random.split(jax.random.key(1), 3)
  w = jax.random.normal(keys[0], lead + (m, n))
  delta = jax.random.normal(keys[1], lead + subspax.reparam.delta_shape(m, n, r, side))
  basis = _stacked_basis(kind, keys[2], lead, d, r)
  layer = subspax.reparam.SubspaceLayer(w, delta, basis)
  merged = subspax.reparam.merge_layers({"w": layer}, side=side)["w"]
  for i in np.ndindex(*lead):
    b = jax.tree.map(lambda a: a[i], basis)
    full = b.back(delta[i], d)  # back(Delta) in the canonical (d, D) layout
    want = w[i] + (full if side == "left" else full.T)
    np.testing.assert_allclose(merged.kernel[i], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(merged.delta, 0.0)
  jax.tree.map(np.testing.assert_array_equal, merged.basis, basis)


def _core_bases(tx, params, grads):
  """The bases `tx` holds after one update per gradient, by parameter path."""
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    _, state = update(g, state, params)
  is_projected = lambda x: isinstance(x, subspax.ProjectedState)
  for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, subspax.SubspaceAdamState)):
    if isinstance(x, subspax.SubspaceAdamState):
      return {path: leaf.basis for path, leaf in
              jax.tree_util.tree_flatten_with_path(x.matrices, is_leaf=is_projected)[0]
              if is_projected(leaf)}
  raise AssertionError("no SubspaceAdamState")


def _unsorted_params(key):
  """Projected kernels whose dict order is not the sorted (flatten) order,
  with an unprojected leaf between them."""
  k1, k2 = jax.random.split(key)
  return {"z_last": {"kernel": jax.random.normal(k1, (2, 12, 16))},
          "m_norm": {"scale": jnp.ones((12,))},
          "a_first": {"kernel": jax.random.normal(k2, (16, 12))}}


@pytest.mark.parametrize("name", ["grass", "rso"])
def test_refresh_bases_are_the_transformations_bases(name):
  """The layers' keys follow the parameters' flatten order, not dict order."""
  interval, r, seed = 3, 4, 7
  params = _unsorted_params(jax.random.key(0))
  grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(10 + i), p.shape),
                        params) for i in range(interval + 1)]
  if name == "grass":
    policy, side = subspax.RowSubspace(), "auto"
    tx = subspax.grass(1e-2, rank=r, update_interval=interval, key=seed)
  else:
    policy, side = subspax.RandomSubspace(), "left"
    tx = subspax.rso(1e-2, rank=r, update_interval=interval, key=seed, side=side)
  kernels = {k: v for k, v in params.items() if "kernel" in v}
  assert list(kernels) != sorted(kernels)

  def layers_of(tree):
    def layer(w):
      m, n = w.shape[-2:]
      d = m if subspax.reparam.resolve_side(m, n, side) == "left" else n
      zeros = policy.zeros(d, r)
      return subspax.reparam.SubspaceLayer(
          w, jnp.zeros(w.shape[:-2] + subspax.reparam.delta_shape(m, n, r, side)),
          jax.tree.map(lambda a: jnp.broadcast_to(a, w.shape[:-2] + a.shape), zeros))
    return jax.tree.map(layer, tree)

  layers = layers_of(kernels)
  for step in (0, interval):
    want = _core_bases(tx, params, grads[:step + 1])
    full = {k: v for k, v in grads[step].items() if "kernel" in v}
    got = jax.jit(lambda g, step: subspax.reparam.refresh_bases(
        layers, policy, interval, jax.random.key(seed), step, grads=g,
        side=side))(full if name == "grass" else None, jnp.asarray(step))
    got = dict(jax.tree_util.tree_flatten_with_path(
        got, is_leaf=lambda x: isinstance(x, subspax.reparam.SubspaceLayer))[0])
    assert got.keys() == want.keys()
    for path, basis in want.items():
      jax.tree.map(np.testing.assert_array_equal, got[path].basis, basis)
      # The rule both sides apply: the index among the projected leaves.
      projected = jax.tree.map(lambda p: p if p.ndim >= 2 else optax.MaskedNode(), params)
      assert (subspax._keys.leaf_index(layers, path, is_leaf=lambda x: isinstance(
          x, subspax.reparam.SubspaceLayer)) == subspax._keys.leaf_index(projected, path))


def test_refresh_bases_keeps_the_old_basis_of_a_non_finite_gradient():
  lead, m, n, r = (3,), 6, 8, 2
  old = _stacked_basis("rows", jax.random.key(2), lead, m, r)
  layer = subspax.reparam.SubspaceLayer(jnp.zeros(lead + (m, n)),
                                        jnp.zeros(lead + (r, n)), old)
  g = jax.random.normal(jax.random.key(3), lead + (m, n)).at[1, 2, 3].set(jnp.nan)
  new = subspax.reparam.refresh_bases(
      [layer], subspax.RowSubspace(selection="topk"), 4, 0, jnp.asarray(4),
      grads=[g], side="left")[0].basis
  np.testing.assert_array_equal(new.index[1], old.index[1])
  np.testing.assert_array_equal(new.scale[1], old.scale[1])
  for i in (0, 2):
    np.testing.assert_array_equal(
        np.sort(new.index[i]), np.sort(jax.lax.top_k(jnp.linalg.norm(g[i], axis=1), r)[1]))
  with pytest.raises(ValueError, match="grads=None"):
    subspax.reparam.refresh_bases([layer], subspax.RowSubspace(), 4, 0, 4)


def test_reset_moments_reinitialises_the_deltas_adam_wherever_it_is_nested():
  params = {"layer": {"delta": jnp.ones((2, 3)), "other": jnp.ones((3,))}}
  labels = {"layer": {"delta": "delta", "other": "other"}}
  tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
      optax.partition({"delta": subspax.reparam.scale_by_delta_adam(prox=0.5),
                       "other": optax.scale_by_adam()}, labels),
      optax.scale_by_learning_rate(learning_rate)))(learning_rate=0.1)
  state = tx.init(params)
  for _ in range(2):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  reset = subspax.reparam.reset_moments(state)
  fresh = tx.init(params)
  inner = lambda s: s.inner_state[0].inner_states
  jax.tree.map(np.testing.assert_array_equal, inner(reset)["delta"],
               inner(fresh)["delta"])
  jax.tree.map(np.testing.assert_array_equal, inner(reset)["other"],
               inner(state)["other"])
  assert int(inner(state)["other"].inner_state.count) == 2
  # The same fields (and so the same checkpoint paths) as optax's Adam state.
  assert subspax.reparam.DeltaAdamState._fields == optax.ScaleByAdamState._fields


def test_checkpoints_of_plain_adam_deltas_restore_into_delta_adam(tmp_path):
  """Layer-mode checkpoints written when the deltas used optax.scale_by_adam
  restore into subspax.reparam.scale_by_delta_adam's state (same paths)."""
  params = {"layer": {"delta": jnp.ones((2, 3))}, "norm": jnp.ones((3,))}
  labels = {"layer": {"delta": "delta"}, "norm": "other"}
  tx = lambda delta_tx: optax.partition(
      {"delta": delta_tx, "other": optax.scale_by_adam()}, labels)
  old = tx(optax.scale_by_adam())
  _, saved = old.update(params, old.init(params), params)
  target = jax.eval_shape(tx(subspax.reparam.scale_by_delta_adam()).init, params)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()
    restored = manager.restore(1, args=ocp.args.StandardRestore(target))
  delta_state = restored.inner_states["delta"].inner_state
  assert isinstance(delta_state, subspax.reparam.DeltaAdamState)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(restored),
               jax.tree.leaves(saved))


def _programs(corpus, name, mode, **overrides):
  cfg = helpers.make_config(corpus, opt__name=name, opt__update_interval=3,
                            opt__warmup_steps=0, **overrides)
  if mode:
    cfg.opt.subspace_layers = True
  if name == "rso":
    cfg.opt.rso.side = "left"  # the plain transformation's side too
  return cfg, train.build_programs(cfg, cfg.data.vocab_size)


def _run(programs, batches):
  state = jax.jit(programs.init)()
  step = jax.jit(programs.train_step)
  refresh = programs.refresh and jax.jit(programs.refresh)
  losses = []
  for i, batch in enumerate(batches):
    if refresh is not None and i % 3 == 0:
      state = refresh(state, batch)
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  return state, losses


@pytest.mark.parametrize("name, scan", [("grass", True), ("grass", False),
                                        ("rso", True)])
def test_mode_reproduces_the_plain_transformation(corpus, name, scan):
  batches = np.random.default_rng(0).integers(0, 320, (8, 8, 65), dtype=np.int32)
  # Adam turns a rounding difference dg in a near-zero gradient entry into a
  # weight difference lr * dg / eps right after a moment reset; eps = 1e-4
  # keeps that (1e-2 * 1e-9 / 1e-4) far below the tolerance, so what is
  # compared is the algorithm, not the summation order of x^T dy.
  overrides = dict(model__scan=scan, opt__eps=1e-4)
  cfg, plain = _programs(corpus, name, False, **overrides)
  _, mode = _programs(corpus, name, True, **overrides)
  plain_state, plain_losses = _run(plain, batches)
  mode_state, mode_losses = _run(mode, batches)
  np.testing.assert_allclose(mode_losses, plain_losses, rtol=1e-5)
  merged = reparam.merged_weights(mode.graphdef, mode_state.params,
                                  reparam.side_option(cfg.opt))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               merged, plain_state.params)


def _compiled(corpus, name, mode, **overrides):
  """The compiled train step, from abstract inputs, and its FLOP prediction."""
  cfg, programs = _programs(corpus, name, mode, **overrides)
  state = jax.eval_shape(programs.init)
  batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
  compiled = jax.jit(programs.train_step, donate_argnums=0).lower(state, batch).compile()
  return compiled, bench_reparam.predicted_flops(cfg, programs)


TINY = dict(model__d_model=256, model__n_layers=2, model__n_heads=4,
            model__d_ff=704, opt__rank=64, seq_len=256,
            data__vocab_size=8192)  # embedding and head stay unprojected (aspect > 8)


def test_modes_compute_and_store_less(corpus):
  results = {(n, m): _compiled(corpus, n, m, **TINY)
             for n, m in (("adamw", False), ("grass", False), ("grass", True),
                          ("rso", False), ("rso", True))}
  compiled = {k: c for k, (c, _) in results.items()}
  memory = {k: c.memory_analysis() for k, c in compiled.items()}
  flops = {k: c.cost_analysis()["flops"] for k, c in compiled.items()}
  footprint = {k: train_memory.compiled_memory(c)["peak"] for k, c in compiled.items()}
  assert footprint["grass", True] < footprint["grass", False]
  assert memory["rso", True].temp_size_in_bytes < memory["adamw", False].temp_size_in_bytes
  # Weight gradients: 2 N r D instead of 2 N m n per projected matrix; the
  # step's FLOPs change as bench.reparam.predicted_flops derives.
  assert flops["grass", True] < flops["grass", False]
  for name, change in (("grass", "rows_change"), ("rso", "dense_change")):
    predicted = results[name, False][1][change]
    np.testing.assert_allclose(flops[name, True] - flops[name, False], predicted,
                               rtol=0.05, err_msg=name)


@pytest.mark.parametrize("name", ["grass", "rso"])
def test_resume_across_a_refresh_is_bit_exact(corpus, tmp_path, name):
  cfg = helpers.make_config(corpus, steps=8, checkpoint_every=3, eval_every=0,
                            opt__name=name, opt__update_interval=3)
  cfg.opt.subspace_layers = True
  # A refresh is due before step 7.
  straight, a = helpers.assert_resume_is_bit_exact(cfg, tmp_path, stop_after=6)
  assert a[8]["train/loss"] < a[1]["train/loss"]
  # The export reads the plain model's weights: the deltas merged.
  model_cfg = hf.read_run_info(str(tmp_path / "straight"))["model"]
  step, weights = checkpoint_lib.restore_params(str(tmp_path / "straight"), model_cfg)
  graphdef = model_lib.abstract_model(model_cfg)[0]
  assert step == 8
  jax.tree.map(np.testing.assert_array_equal, weights, reparam.merged_weights(
      graphdef, jax.device_get(straight.state.params), model_cfg.reparam_side))


@pytest.mark.parametrize("name", ["grass", "rso"])
def test_sharded_remat_run_matches_one_device(corpus, tmp_path, name):
  losses = {}
  for data, fsdp, tensor in ((1, 1, 1), (2, 2, 2)):
    cfg = helpers.make_config(corpus, steps=4, eval_every=0, opt__name=name,
                              opt__update_interval=2, model__remat=True,
                              mesh__data=data, mesh__fsdp=fsdp, mesh__tensor=tensor)
    cfg.opt.subspace_layers = True
    workdir = tmp_path / f"{data}{fsdp}{tensor}"
    train.run(cfg, str(workdir))
    losses[data, fsdp, tensor] = [r["train/loss"] for r in helpers.records(workdir).values()]
  np.testing.assert_allclose(losses[2, 2, 2], losses[1, 1, 1], rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"opt.name": "subtrack", "opt.subspace_layers": True},
     "opt.subspace_layers=True is a mode of opt.name 'grass' or 'rso'"),
    ({"opt.name": "grass", "opt.subspace_layers": True, "opt.weight_decay": 0.1},
     "opt.weight_decay"),
    ({"opt.name": "grass", "opt.subspace_layers": True, "opt.grass.recovery": True},
     r"opt.grass.recovery=True is not supported by the grass subspace-layer mode"),
    ({"opt.name": "rso", "opt.subspace_layers": True, "opt.rso.store_basis": False},
     "opt.rso.store_basis=False is not supported"),
])
def test_bad_mode_config_is_a_clear_error(corpus, tmp_path, overrides, message):
  cfg = helpers.make_config(corpus)
  cfg.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message):
    train.run(cfg, str(tmp_path))


def test_rso_prox_adds_prox_times_delta_to_its_gradient(corpus):
  cfg = helpers.make_config(corpus, opt__name="rso", opt__rso__prox=2.0,
                            opt__subspace_layers=True)
  reparam.validate(cfg.opt)
  tx = reparam.build_tx(cfg.opt, cfg.steps,
                        {"layer": {"delta": "delta"}, "norm": "other"})
  trainable = {"layer": {"delta": jnp.full((2, 3), 0.5)}, "norm": jnp.ones((3,))}
  state = tx.init(trainable)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, trainable), state, trainable)
  inner = state[0].inner_states
  delta_mu = jax.tree.leaves(inner["delta"].inner_state[1].mu)[0]
  np.testing.assert_allclose(delta_mu, (1 - cfg.opt.b1) * 2.0 * 0.5)
  other_mu = jax.tree.leaves(inner["other"].inner_state.mu)[0]
  np.testing.assert_array_equal(other_mu, 0.0)


def _all_reduce_bytes(hlo: str) -> int:
  """Bytes of every all-reduce result in an optimized HLO module."""
  sizes = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2}
  total = 0
  for line in hlo.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    result = line.split("=", 1)[1].split("all-reduce", 1)[0]
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
      total += sizes.get(dtype, 4) * math.prod(int(x) for x in dims.split(",") if x)
  return total


def test_data_parallel_all_reduce_moves_reduced_gradients(corpus):
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(
      {"data": 8, "fsdp": 1, "tensor": 1}))
  for mode in (False, True):
    # Unscanned: XLA would count an all-reduce inside the layer loop once.
    cfg, programs = _programs(corpus, "grass", mode, model__scan=False)
    shardings = train.train_state_shardings(
        programs, mesh, sharding_lib.parse_rules(cfg.mesh.rules))
    batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
    with jax.set_mesh(mesh):
      step = jax.jit(programs.train_step,
                     in_shardings=(shardings, sharding_lib.batch_sharding(mesh)))
      hlo = step.lower(jax.eval_shape(programs.init), batch).compile().as_text()
    # Exactly the trainable leaves' gradients (and the loss) are all-reduced:
    # r x D per projected matrix in the sparse mode, m x n in the plain one.
    trainable = model_lib.trainable(programs.graphdef, programs.param_shapes)
    grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(trainable))
    assert _all_reduce_bytes(hlo) == grad_bytes + 4, mode
    trained = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(trainable)]
    assert any("['delta']" in name for name in trained) == mode
    assert any("['mlp']['up']['kernel']" in name for name in trained) != mode

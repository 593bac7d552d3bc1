"""End-to-end tests of the trainer on the test preset (configs/test.py).

The corpus is generated text in a temporary directory (nothing is downloaded);
the session runs on 8 fake CPU devices (tests/conftest.py), and the preset's
1x1x1 mesh uses one of them unless a test asks for more.
"""

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import subspax
from train import checkpoint as checkpoint_lib
from train import model as model_lib
from train import optimizers
from train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train/loss and train/grad_norm of step 1 (at the peak lr: no warmup) and
# eval/loss after it, measured once on this corpus with the test preset
# (SubTrack++); a change to the model, optimizer, data pipeline or init shows here.
GOLDEN = {"train/loss": 5.791309, "train/grad_norm": 0.787438, "eval/loss": 5.595133}


def cli(*args, env=None, **kwargs):
  """`python -m train` with the repo as working directory."""
  return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def cli_args(corpus, workdir, *extra):
  """Test preset with AdamW (the cheapest to compile) on the generated corpus."""
  return ["--config", "configs/test.py", f"--workdir={workdir}",
          "--config.opt.name=adamw",
          *(f"--config.{k}={v}" for k, v in corpus.items()), *extra]


@pytest.mark.parametrize("preset, millions", [
    ("tiny", 7.4), ("llama_60m", 58), ("llama_130m", 134), ("llama_350m", 368),
    ("llama_1b", 1339), ("llama_7b", 6738), ("llama_13b", 13016),
    ("llama_7b_24gb", 6738), ("llama_13b_40gb", 13016)])
def test_presets_load_and_have_the_paper_sizes(preset, millions):
  cfg = importlib.import_module(f"configs.{preset}").get_config()
  train.validate(cfg)
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  optimizers.validate(cfg.opt, model_cfg, cfg.steps)
  assert cfg.opt.name == ("grass" if preset == "llama_13b_40gb" else "subtrack")
  np.testing.assert_allclose(model_lib.count_params(model_cfg) / 1e6, millions, rtol=0.01)


def test_one_step_matches_golden_and_is_deterministic(corpus, tmp_path):
  cfg = helpers.make_config(corpus, steps=1, opt__warmup_steps=0)
  first = train.run(cfg, str(tmp_path / "a")).metrics
  for key, value in GOLDEN.items():
    np.testing.assert_allclose(first[key], value, atol=1e-5, err_msg=key)
  second = train.run(cfg, str(tmp_path / "b")).metrics
  assert second["train/loss"] == first["train/loss"]
  assert second["eval/loss"] == first["eval/loss"]
  assert first["opt/state_bytes"] > 0 and first["perf/tokens_per_sec"] > 0
  assert os.path.exists(tmp_path / "a" / "loss.png")


@pytest.mark.parametrize("name, scan, param_dtype", [
    ("adamw", False, "float32"), ("subtrack", True, "float32"),
    pytest.param("subtrack", True, "bfloat16", marks=pytest.mark.slow),
])  # bfloat16 weights: stochastic rounding, keyed by seed and step
def test_resume_is_bit_exact(corpus, tmp_path, name, scan, param_dtype):
  cfg = helpers.make_config(corpus, steps=8, checkpoint_every=3, eval_every=0,
                    opt__name=name, opt__update_interval=3, model__scan=scan,
                    model__param_dtype=param_dtype)
  straight = train.run(cfg, str(tmp_path / "straight"))
  cfg.stop_after = 4
  train.run(cfg, str(tmp_path / "split"))
  assert helpers.records(tmp_path / "split").keys() == {1, 2, 3, 4}
  cfg.stop_after = 0
  resumed = train.run(cfg, str(tmp_path / "split"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(straight.state))
  a, b = helpers.records(tmp_path / "straight"), helpers.records(tmp_path / "split")
  assert a.keys() == b.keys() == set(range(1, 9))
  assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]
  # Step 6 was saved asynchronously while step 7 already reused (donated) the
  # state's buffers: resuming from it must still land on the same step 8.
  shutil.copytree(tmp_path / "straight" / "checkpoints" / "6",
                  tmp_path / "from6" / "checkpoints" / "6")
  from6 = train.run(cfg, str(tmp_path / "from6"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from6.state),
               jax.device_get(straight.state))


def test_checkpoint_round_trip_keeps_zero_size_arrays_and_shardings(tmp_path):
  mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = {"w": NamedSharding(mesh, P(None, "tensor")),
               "empty": NamedSharding(mesh, P())}
  state = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8), shardings["w"]),
           "empty": jax.device_put(jnp.zeros((0,)), shardings["empty"])}
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(data_iter)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(1, state, data_iter)
  checkpointer.wait()
  fresh_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  restored = checkpointer.restore(
      1, checkpoint_lib.abstract(state, shardings), fresh_iter)
  checkpointer.close()
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert restored["w"].sharding == shardings["w"]
  assert restored["empty"].shape == (0,)
  assert next(fresh_iter) == 1


@pytest.mark.slow
def test_killed_run_restarts_without_losing_a_checkpoint(corpus, tmp_path):
  workdir = tmp_path / "run"
  args = cli_args(corpus, workdir, "--config.steps=60", "--config.checkpoint_every=5",
                  "--config.eval_every=0")
  proc = cli(*args)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if checkpoints.exists() else []
    if done and max(done) >= 10:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
  assert done and max(done) >= 10, "no checkpoint was written before the kill"
  saved = max(done)
  restart = cli(*args)
  out, _ = restart.communicate(timeout=300)
  assert restart.returncode == 0, out
  resumed = int(out.split("resumed from step ")[1].split()[0])
  assert resumed >= saved
  assert sorted(helpers.records(workdir)) == list(range(1, 61))


def test_scan_and_remat_give_the_same_loss(corpus, tmp_path):
  losses = {}
  for scan, remat in ((False, False), (True, False), (False, True)):
    workdir = tmp_path / f"{scan}-{remat}"
    cfg = helpers.make_config(corpus, steps=3, eval_every=0, opt__name="adamw",
                      model__scan=scan, model__remat=remat)
    train.run(cfg, str(workdir))
    losses[scan, remat] = [r["train/loss"] for r in helpers.records(workdir).values()]
  for value in losses.values():
    np.testing.assert_allclose(value, losses[False, False], rtol=1e-5)


def test_sharded_meshes_match_one_device_and_shard_subspace_states(corpus, tmp_path):
  assert jax.device_count() == 8
  losses, results = {}, {}
  for data, fsdp, tensor in ((1, 1, 1), (2, 1, 4), (1, 8, 1)):
    # Unscanned layers: jaxlib 0.10.2's batched CPU LAPACK kernels (the SVD of
    # a stacked (L, m, n) refresh) can deadlock with 8 host devices on 2 cores.
    cfg = helpers.make_config(corpus, steps=3, eval_every=0, opt__update_interval=2,
                      model__scan=False, mesh__data=data, mesh__fsdp=fsdp,
                      mesh__tensor=tensor)
    workdir = tmp_path / f"{data}x{fsdp}x{tensor}"
    results[data, fsdp, tensor] = train.run(cfg, str(workdir))
    losses[data, fsdp, tensor] = [r["train/loss"] for r in helpers.records(workdir).values()]
  for mesh, value in losses.items():
    np.testing.assert_allclose(value, losses[1, 1, 1], atol=1e-4, err_msg=str(mesh))
  for mesh in ((2, 1, 4), (1, 8, 1)):
    opt_state = results[mesh].state.opt_state
    reduced = [x for x in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, subspax.ProjectedState))
               if isinstance(x, subspax.ProjectedState)]
    assert reduced, "no projected parameters"
    for state in reduced:  # split along the kept or the projected dimension
      shardings = [state.mu.sharding] + [b.sharding for b in jax.tree.leaves(state.basis)]
      assert not all(s.is_fully_replicated for s in shardings), (mesh, shardings)
    kernel = results[mesh].state.params["blocks"][0]["mlp"]["up"]["kernel"]
    assert not kernel.sharding.is_fully_replicated


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_every_optimizer_lowers_the_loss(corpus, tmp_path, name):
  cfg = helpers.make_config(corpus, steps=30, eval_every=0, checkpoint_every=30,
                    opt__name=name)  # optax_galore unrolls the scanned layers
  result = train.run(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in helpers.records(tmp_path).values()]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  assert result.metrics["eval/loss"] < losses[0] - 1.0


def _shards(corpus, root):
  """The corpus's lines as four JSON lines shards, 25 lines per document."""
  with open(corpus["data.files"]) as f:
    lines = f.read().splitlines()
  docs = ["\n".join(lines[i:i + 25]) for i in range(0, len(lines), 25)]
  for k in range(4):
    with open(root / f"part-{k}.jsonl", "w") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in docs[k::4])
  return {"data.corpus": "files", "data.files": str(root / "part-*.jsonl"),
          "data.dir": str(root / "cache")}


@pytest.mark.slow
@pytest.mark.parametrize("corpus_kind", ["text_files", "files"])
def test_two_processes_train_together(corpus, tmp_path, corpus_kind):
  """Two CPU processes, on a text file each reads all of, or on shards each
  reads half of (their held-out batch counts agreed by an all-gather)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  data = corpus if corpus_kind == "text_files" else _shards(corpus, tmp_path)
  args = cli_args(data, tmp_path / "run", "--config.steps=4",
                  "--config.checkpoint_every=2", "--config.mesh.data=-1")
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs.append(cli(*args, env=env))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "'data': 2" in outs[0]
  assert sorted(helpers.records(tmp_path / "run")) == [1, 2, 3, 4]
  data_files = os.listdir(tmp_path / "run" / "checkpoints" / "4" / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(opt__name="sgd"), ValueError, "unknown optimizer opt.name='sgd'"),
    (dict(mesh__data=3), ValueError, "does not divide the 8 available devices"),
    (dict(mesh__data=4, batch_size=6), ValueError,
     r"batch_size=6 is not divisible by the data axes"),
    (dict(opt__rank=32), ValueError, "smaller side of one of the blocks' kernels "
     "at least, the largest being 32"),
    (dict(opt__rank=32, opt__projected="attn"), ValueError,
     "smallest projected dimension 32 .* or leave it out of opt.projected"),
    (dict(model__attention="flash"), ValueError,
     "model.attention must be one of auto, xla, blockwise, got 'flash'"),
    (dict(model__attention_block=0), ValueError,
     "model.attention_block must be a positive int, got 0"),
    (dict(opt__name="apollo", opt__apollo__scale_type="row"), ValueError,
     "opt.apollo.scale_type='row' is not one of channel, tensor"),
    (dict(opt__name="rso", opt__rso__prox=-1.0), ValueError,
     r"opt.rso: prox must be >= 0"),
    (dict(mesh__tensor=8, model__d_ff=100), ValueError, "cannot be split evenly"),
    (dict(opt__clip_norm=-1.0), ValueError, r"opt.clip_norm must be >= 0"),
    (dict(data__files="/nonexistent/text.txt"), FileNotFoundError, "names no file"),
    (dict(data__files="EMPTY"), ValueError, "is empty"),
])
def test_bad_input_fails_before_compute(corpus, tmp_path, overrides, error, message):
  if overrides.get("data__files") == "EMPTY":
    (tmp_path / "empty.txt").touch()
    overrides = {**overrides, "data__files": str(tmp_path / "empty.txt")}
  with pytest.raises(error, match=message):
    train.run(helpers.make_config(corpus, **overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_a_clear_cli_error(tmp_path):
  proc = cli("--config", "configs/test.py", "--config.opt.nme=adamw",
             f"--workdir={tmp_path}")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "unknown config key 'nme' in --config.opt.nme=adamw" in out
  assert 'Did you mean "name"' in out


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_equals_optax(max_norm):
  """subspax.clip_by_global_norm multiplies by min(1, max_norm / norm) and
  scales the `in_place` stacks layer by layer: optax's result to float32
  rounding, exactly when nothing is clipped."""
  keys = jax.random.split(jax.random.key(0), 3)
  grads = {"stack": jax.random.normal(keys[0], (4, 8, 6)),
           "other_stack": jax.random.normal(keys[1], (3, 5, 2)),
           "matrix": jax.random.normal(keys[2], (5, 7)), "empty": jnp.zeros((0, 3))}
  in_place = lambda path, leaf: path[0].key == "stack"
  ours, _ = jax.jit(subspax.clip_by_global_norm(max_norm, in_place).update)(grads, None)
  theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  for name in grads:
    if max_norm > 10:
      np.testing.assert_array_equal(ours[name], grads[name], err_msg=name)
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=0, err_msg=name)
  if max_norm < 10:
    np.testing.assert_allclose(optax.tree.norm(ours), max_norm, rtol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
def test_ordinary_and_refresh_programs_equal_the_one_program(layerwise):
  """The trainer runs a subspax method as two programs, an ordinary step and a
  refresh step, chosen on the host by the step count; the states equal those
  of one program that decides inside (`refresh=None`) across refreshes, to
  float32 rounding (XLA fuses the three programs differently, and a refresh
  amplifies the last bits a little), and the step counts agree with the
  host's. A refresh skipped or taken at the wrong step moves the weights by
  orders of magnitude more."""
  cfg = helpers.make_config({}, opt__name="subtrack", opt__update_interval=2,
                            opt__layerwise=layerwise, mesh__data=1)
  programs = train.build_programs(cfg, cfg.data.vocab_size)
  assert programs.refresh_step is not None and programs.ordinary_step is not None
  batches = jax.random.randint(jax.random.key(0), (3, cfg.batch_size, cfg.seq_len + 1),
                               0, cfg.data.vocab_size, jnp.int32)
  ordinary, refresh = jax.jit(programs.ordinary_step), jax.jit(programs.refresh_step)
  one = jax.jit(programs.train_step)
  a = b = jax.jit(programs.init)()
  for step, batch in enumerate(batches, start=1):
    a, _ = (refresh if train.is_refresh_step(step, cfg.opt.update_interval)
            else ordinary)(a, batch)
    b, _ = one(b, batch)
  counts = [x for x in jax.tree.leaves(a.opt_state) if x.dtype == jnp.int32 and not x.ndim]
  assert counts and all(int(c) == int(a.step) for c in counts)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
               a, b)

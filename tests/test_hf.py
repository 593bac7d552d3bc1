"""Hugging Face interop (train/hf.py, train/export.py) and TensorBoard / profiles.

The fixture `tests/fixtures/hf_llama` is a tiny random LlamaForCausalLM (GQA,
rope_theta 500000, untied, two safetensors shards with an index, a byte-level
BPE tokenizer.json) and `hf_llama_logits.npz` the logits transformers computed
for it; both were written once by `tests/fixtures/make_hf_llama.py` (torch is
not a test dependency).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from train import errors
from train import export
from train import checkpoint as checkpoint_lib
from train import hf
from train import metrics as metrics_lib
from train import model as model_lib
from train import sharding as sharding_lib
from train import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf_llama")
LOGITS = os.path.join(REPO, "tests", "fixtures", "hf_llama_logits.npz")


def _model_cfg(scan=True, directory=FIXTURE):
  return model_lib.LlamaConfig(**hf.model_fields(hf.read_config(directory)), scan=scan)


def _load(cfg, directory=FIXTURE, mesh_sizes=(1, 2, 4)):
  """The checkpoint on a (data, fsdp, tensor) mesh of the 8 CPU devices."""
  mesh = jax.make_mesh(mesh_sizes, sharding_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = {"embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",),
           "vocab": ("tensor",), "layers": ()}
  graphdef, shapes, names = model_lib.abstract_model(cfg)
  shardings = sharding_lib.param_shardings(mesh, shapes, names, rules)
  return graphdef, hf.load_params(directory, cfg, shapes, shardings), shardings


@pytest.mark.parametrize("scan, mesh_sizes", [(True, (1, 2, 4)), (False, (1, 1, 1))])
def test_loading_reproduces_the_transformers_logits(scan, mesh_sizes):
  ref = np.load(LOGITS)
  cfg = _model_cfg(scan)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 16, 5e5)
  graphdef, params, shardings = _load(cfg, mesh_sizes=mesh_sizes)
  # Placed sharded as asked (the q kernel over 'tensor', the embedding over both).
  assert jax.tree.all(jax.tree.map(lambda p, s: p.sharding == s, params, shardings))
  logits = jax.jit(lambda p, t: model_lib.apply(graphdef, p, t))(
      params, jnp.asarray(ref["tokens"]))
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


def test_export_then_import_is_exact(tmp_path):
  cfg = _model_cfg(scan=True)
  _, params, _ = _load(cfg, mesh_sizes=(8, 1, 1))
  out = hf.save(str(tmp_path / "out"), params, cfg,
                base_config=hf.read_config(FIXTURE), max_shard_bytes=100_000)
  files = sorted(os.listdir(out))
  assert hf.INDEX_FILE in files and "model-00002-of-00005.safetensors" in files
  config = hf.read_config(out)
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert (config["num_key_value_heads"], config["rope_theta"],
          config["tie_word_embeddings"], config["eos_token_id"]) == (2, 5e5, False, 1)
  # Same names, shapes and dtypes as transformers wrote.
  reference = {k: (v.shape, v.dtype) for k, v in _tensors(FIXTURE).items()}
  assert {k: (v.shape, v.dtype) for k, v in _tensors(out).items()} == reference
  for scan in (True, False):  # into either layout
    cfg2 = _model_cfg(scan, out)
    _, back, _ = _load(cfg2, out)
    direct = _load(_model_cfg(scan))[1]
    assert jax.tree.all(jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), back, direct))


def _tensors(directory):
  out = {}
  for f in os.listdir(directory):
    if f.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(directory, f)))
  return out


def test_tied_embeddings_become_the_head(tmp_path):
  tied = tmp_path / "tied"
  tied.mkdir()
  tensors = _tensors(FIXTURE)
  del tensors["lm_head.weight"]
  safetensors.numpy.save_file(tensors, str(tied / "model.safetensors"),
                              metadata={"format": "pt"})
  config = {**hf.read_config(FIXTURE), "tie_word_embeddings": True}
  (tied / "config.json").write_text(json.dumps(config))
  cfg = _model_cfg(scan=False, directory=str(tied))
  _, params, _ = _load(cfg, str(tied))
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]),
                                tensors["model.embed_tokens.weight"].T)
  (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
  with pytest.raises(errors.UserError, match="incomplete"):
    _load(cfg, str(tied))


def test_bfloat16_weights_load_into_float32(tmp_path):
  bf16 = tmp_path / "bf16"
  shutil.copytree(FIXTURE, bf16)
  for f in os.listdir(bf16):
    if f.endswith(".safetensors"):
      path = str(bf16 / f)
      tensors = safetensors.numpy.load_file(path)
      safetensors.numpy.save_file(
          {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}, path,
          metadata={"format": "pt"})
  cfg = _model_cfg(scan=True, directory=str(bf16))
  _, params, _ = _load(cfg, str(bf16))
  q = params["blocks"]["attn"]["q"]["kernel"]
  assert q.dtype == jnp.float32
  expected = _tensors(FIXTURE)["model.layers.1.self_attn.q_proj.weight"].T
  np.testing.assert_array_equal(np.asarray(q[1]), expected.astype(jnp.bfloat16)
                                .astype(np.float32))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen2ForCausalLM"]}, "'Qwen2ForCausalLM' cannot be loaded"),
    ({"attention_bias": True}, "uses attention_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope type 'llama3'"),
    ({"hidden_act": "gelu"}, "uses hidden_act"),
    ({"sliding_window": 32}, "sliding_window 32 < seq_len 64"),
])
def test_unsupported_configs_are_one_line_errors(change, message):
  config = {**hf.read_config(FIXTURE), **change}
  with pytest.raises(errors.UserError, match=message) as e:
    hf.model_fields(config, seq_len=64)
  assert "\n" not in str(e.value)


def test_transformers_4_config_keys():
  config = {k: v for k, v in hf.read_config(FIXTURE).items() if k != "rope_parameters"}
  assert hf.model_fields({**config, "rope_theta": 1e6})["rope_theta"] == 1e6
  assert hf.model_fields({**config, "rope_scaling": None})["rope_theta"] == 1e4
  no_gqa = {k: v for k, v in config.items() if k not in ("num_key_value_heads", "head_dim")}
  fields = hf.model_fields(no_gqa)
  assert (fields["n_kv_heads"], fields["head_dim"]) == (4, 16)


def test_missing_directory_and_weights(tmp_path):
  with pytest.raises(errors.MissingFileError, match="no such directory"):
    hf.read_config(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(json.dumps(hf.read_config(FIXTURE)))
  with pytest.raises(errors.MissingFileError, match=r"no \*\.safetensors"):
    hf.load_params(str(tmp_path), _model_cfg(), None, None)


def test_json_tokenizer_encodes_documents():
  tok = tokenizer_lib.load(os.path.join(FIXTURE, "tokenizer.json"))
  assert (tok.vocab_size(), tok.eos_id()) == (320, 1)
  tokens = tokenizer_lib.encode_documents(
      tok, [("Sweet love.\nThe king", False), (" of night.", True)])
  assert tokens[-1] == tok.eos_id() and tokens.dtype == np.uint16
  assert tok.decode(tokens[:-1].tolist()) == "Sweet love.\nThe king of night."


def test_profile_steps_field():
  assert metrics_lib.parse_profile_steps("") is None
  assert metrics_lib.parse_profile_steps("3") == (3, 3)
  assert metrics_lib.parse_profile_steps("2,5") == (2, 5)
  for bad in ("5,2", "0,1", "a,b", "1,2,3"):
    with pytest.raises(errors.UserError, match="profile_steps must be"):
      metrics_lib.parse_profile_steps(bad)


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_export_leaves_out_as_it_was(tmp_path, existing):
  """A write that fails half-way leaves no `out` (or the old one, intact
  with --overwrite) and no staging directory."""
  out = tmp_path / "hf"
  if existing:
    out.mkdir()
    (out / "config.json").write_text("old")

  def crash(directory):
    (tmp_path / "seen").write_text(directory)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
      f.write(b"half")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    export.write_atomically(str(out), crash, overwrite=True)
  assert not os.path.exists((tmp_path / "seen").read_text())
  assert sorted(os.listdir(tmp_path)) == (["hf", "seen"] if existing
                                          else ["seen"])
  if existing:
    assert os.listdir(out) == ["config.json"]
    assert (out / "config.json").read_text() == "old"


def _cli(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_fine_tune_from_hf_and_export_via_the_cli(corpus, tmp_path):
  workdir = tmp_path / "ft"
  _cli("train", "--config", "configs/test.py", f"--workdir={workdir}",
       f"--config.init_from={FIXTURE}", "--config.opt.name=adamw",
       "--config.steps=8", "--config.eval_every=4",
       "--config.profile_steps=3,4",
       *(f"--config.{k}={v}" for k, v in corpus.items()))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r["eval/loss"] for r in records if "eval/loss" in r]
  assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.3
  assert evals[-1] < evals[0]
  # TensorBoard: the same scalars beside metrics.jsonl, and the profile.
  tb = workdir / metrics_lib.TENSORBOARD_DIR
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
  assert list(tb.glob("plugins/profile/*/*.xplane.pb"))

  out = tmp_path / "hf"
  assert "LlamaForCausalLM" in _cli("train.export", f"--workdir={workdir}", f"--out={out}")
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= set(os.listdir(out))
  info = hf.read_run_info(str(workdir))
  step, trained = checkpoint_lib.restore_params(str(workdir), info["model"])
  assert step == 8
  _, back, _ = _load(_model_cfg(scan=True, directory=str(out)), str(out))
  assert jax.tree.all(jax.tree.map(
      lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), back, trained))
  fixture = _load(_model_cfg(scan=True))[1]
  assert not np.array_equal(np.asarray(back["head"]["kernel"]),
                            np.asarray(fixture["head"]["kernel"]))

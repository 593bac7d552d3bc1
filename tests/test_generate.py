"""`python -m train.generate`: decoding a run's checkpoint with a key/value cache."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint as checkpoint_lib
from train import generate as generate_lib
from train import hf
from train import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The king and"  # one prompt and length: each test reuses the compiled steps
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


def _cli(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def workdir(corpus, tmp_path_factory):
  """Two AdamW steps of the test preset (scanned layers) with bfloat16 weights."""
  run = tmp_path_factory.mktemp("gen") / "run"
  status, out, err = _cli(
      "train", "--config", "configs/test.py", f"--workdir={run}",
      "--config.opt.name=adamw", "--config.steps=2", "--config.model.param_dtype=bfloat16",
      *(f"--config.{k}={v}" for k, v in corpus.items()))
  assert status == 0, out + err
  return str(run)


def test_decoding_logits_equal_the_forward_pass(workdir):
  """Each generated token's logits (cached decoding) are the trained model's
  forward pass over prompt + tokens, at that position."""
  model = generate_lib.load(workdir)
  assert model.step == 2
  assert jax.tree.leaves(model.params)[0].dtype == jnp.bfloat16
  out = generate_lib.generate(model, PROMPT, max_tokens=8, top_p=0.9,
                              temperature=2.0, seed=3, stop_at_eos=False)
  prompt = generate_lib.tokenizer_lib.encode_documents(
      model.tokenizer, [(PROMPT, False)]).tolist()
  info = hf.read_run_info(workdir)
  assert info["model"].scan  # the forward pass below runs the scanned model
  _, params = checkpoint_lib.restore_params(workdir, info["model"])
  graphdef = model_lib.abstract_model(info["model"])[0]
  sequence = jnp.asarray([prompt + out.tokens[:-1]], jnp.int32)
  logits = model_lib.apply(graphdef, params, sequence)[0, len(prompt) - 1:]
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-5)
  assert len(out.tokens) == 8


def test_same_seed_same_text_greedy_is_the_argmax(workdir):
  model = generate_lib.load(workdir)
  sample = lambda seed: generate_lib.generate(
      model, PROMPT, max_tokens=8, top_p=0.95, temperature=3.0, seed=seed,
      stop_at_eos=False).tokens
  assert sample(1) == sample(1)
  assert sample(1) != sample(2)
  greedy = generate_lib.generate(model, PROMPT, max_tokens=8, stop_at_eos=False)
  assert greedy.tokens == np.argmax(greedy.logits, axis=-1).tolist()


def test_the_command_line_prints_the_continuation(workdir):
  """The CLI samples what `generate` samples in-process for the same seed."""
  status, out, err = _cli("train.generate", "--workdir", workdir, "--prompt",
                          PROMPT, "--max_tokens", 8, "--top_p", 0.9, "--seed", 4)
  assert status == 0, err
  expected = generate_lib.generate(generate_lib.load(workdir), PROMPT,
                                   max_tokens=8, top_p=0.9, seed=4)
  assert out == PROMPT + expected.text + "\n"
  status, _, err = _cli("train.generate", "--workdir", workdir, "--prompt", "x",
                        "--top_p", 1.5, "--max_tokens", 0)
  assert status == 2
  assert err.strip().splitlines()[-1] == (
      "error: 2 problems: --max_tokens must be >= 1, got 0; --top_p must be in "
      "[0, 1] (0: greedy), got 1.5")

"""Command line: `python -m train.generate --workdir W --prompt "..."`: text from a run.

Loads the model of a run's checkpoint (the latest, or `--step`; float32 or
bfloat16 weights, reparametrised layers merged) and the run's tokenizer
(`WORKDIR/tokenizer.model` or `.json`, which `python -m train` writes), encodes
the prompt and decodes up to `--max_tokens` tokens with a key/value cache: one
forward pass over the prompt, then one position per token. `--top_p=0` (the
default) is greedy decoding; `--top_p=0.9` samples from the smallest set of
tokens holding 90% of the probability (nucleus sampling), after dividing the
logits by `--temperature`, with `--seed` fixing the draws. Decoding stops early
at the end-of-sequence token.

Example:

  python -m train --config configs/tiny.py --workdir runs/tiny
  python -m train.generate --workdir runs/tiny --prompt "KING RICHARD:" \\
      --max_tokens 100 --top_p 0.9 --seed 1
"""

import dataclasses
import functools
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from train import checkpoint as checkpoint_lib
from train import errors
from train import hf
from train import model as model_lib
from train import tokenizer as tokenizer_lib

class Model(NamedTuple):
  """A run's model, ready to decode (layers unstacked) and its tokenizer."""

  cfg: model_lib.LlamaConfig  # unscanned, no remat, no reparametrisation
  graphdef: nnx.GraphDef
  params: dict  # per-layer weights, in the checkpoint's dtype
  tokenizer: Any  # sentencepiece processor or tokenizer.JsonTokenizer
  step: int  # the checkpoint's step


class Output(NamedTuple):
  """What `generate` returns."""

  tokens: list[int]  # the generated tokens (not the prompt)
  logits: np.ndarray  # float32 (len(tokens), V): what each token was chosen from
  text: str  # the tokens decoded


def unstack_layers(params: dict, n_layers: int) -> dict:
  """A scanned model's parameters in the layout of the unscanned model.

  Example:
    unstack_layers(params, 2)["blocks"][1]["attn"]["q"]["kernel"]  # layer 1's

  Args:
    params: parameters whose `blocks` hold stacked `(L, ...)` arrays.
    n_layers: L.

  Returns:
    `params` with `blocks` as the per-layer dicts `{0: ..., 1: ...}`.
  """
  blocks = params["blocks"]
  return {**params, "blocks": {
      i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n_layers)}}


def load(workdir: str, step: int | None = None, tokenizer: str = "") -> Model:
  """The model of a run's checkpoint and the run's tokenizer.

  Example:
    model = load("runs/tiny")
    print(generate(model, "KING:", max_tokens=20).text)

  Args:
    workdir: The run directory.
    step: The checkpoint step; None for the latest.
    tokenizer: A tokenizer file; "" for the run's own.

  Returns:
    The `Model`.

  Raises:
    UserError: the workdir has no run, no such checkpoint, or no tokenizer.
  """
  info = hf.read_run_info(workdir)
  cfg = info["model"]
  step, params = checkpoint_lib.restore_params(workdir, cfg, step)
  if cfg.scan:
    params = unstack_layers(params, cfg.n_layers)
  cfg = dataclasses.replace(cfg, scan=False, remat=False, reparam="",
                            kernel_format="float")  # restore_params dequantizes
  graphdef = model_lib.abstract_model(cfg)[0]
  return Model(cfg, graphdef, params, tokenizer_lib.load(_tokenizer_path(
      workdir, tokenizer, info)), step)


def _tokenizer_path(workdir: str, path: str, info: dict) -> str:
  if path:
    if not os.path.isfile(path):
      raise errors.MissingFileError(f"--tokenizer: no such file {path!r}")
    return path
  candidates = [os.path.join(workdir, name) for name in tokenizer_lib.RUN_FILES]
  candidates += [f for f in info["tokenizer_files"] if f.endswith((".model", ".json"))
                 and os.path.basename(f) != "tokenizer_config.json"]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise errors.MissingFileError(
      f"--workdir: {workdir!r} holds no tokenizer.model or tokenizer.json; pass "
      "--tokenizer=PATH (the run's data.tokenizer, or the .model file under its "
      "data.dir/tokenizers)")


def check_options(max_tokens: int, top_p: float, temperature: float) -> None:
  """Rejects sampling options out of range, naming each flag and its range.

  Example:
    check_options(64, 0.9, 1.0)  # passes

  Raises:
    UserError: every bad option, in one line.
  """
  errors.gather(
      lambda: _check(max_tokens >= 1, f"--max_tokens must be >= 1, got {max_tokens}"),
      lambda: _check(0 <= top_p <= 1, f"--top_p must be in [0, 1] (0: greedy), got "
                     f"{top_p}"),
      lambda: _check(temperature > 0, f"--temperature must be > 0, got {temperature}"))


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _forward(graphdef: nnx.GraphDef, params: dict, tokens_1xL: jax.Array,
             caches: list[model_lib.KVCache], start: jax.Array
             ) -> tuple[jax.Array, list[model_lib.KVCache]]:
  """The last position's logits (V,) and the caches extended by `tokens_1xL`."""
  logits_1xLxV, caches = nnx.merge(graphdef, params).decode(tokens_1xL, caches, start)
  return logits_1xLxV[0, -1], caches


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pick(logits_V: jax.Array, key: jax.Array, top_p: float,
          temperature: float) -> jax.Array:
  """The next token: the argmax, or a draw from the top-p nucleus."""
  if top_p == 0:
    return jnp.argmax(logits_V)
  logits_V = logits_V / temperature
  probs_V = jax.nn.softmax(logits_V)
  order_V = jnp.argsort(-probs_V)
  sorted_V = probs_V[order_V]
  # A token is kept if the more likely ones hold less than top_p (the most
  # likely is always kept).
  keep_V = jnp.zeros_like(probs_V, bool).at[order_V].set(
      jnp.cumsum(sorted_V) - sorted_V < top_p)
  return jax.random.categorical(key, jnp.where(keep_V, logits_V, -jnp.inf))


def generate(model: Model, prompt: str | list[int], *, max_tokens: int = 64,
             top_p: float = 0.0, temperature: float = 1.0, seed: int = 0,
             stop_at_eos: bool = True) -> Output:
  """Continues a prompt, decoding with a key/value cache.

  Example:
    generate(load("runs/tiny"), "KING:", max_tokens=20, top_p=0.9, seed=1).text

  Args:
    model: From `load`.
    prompt: Text, or token ids.
    max_tokens: Most tokens to generate.
    top_p: 0 for greedy decoding; else sample from the top-p nucleus.
    temperature: Divides the logits before sampling (not used by greedy).
    seed: The draws of token `i` use `fold_in(key(seed), i)`.
    stop_at_eos: Stop after the end-of-sequence token.

  Returns:
    The tokens, the logits each was chosen from and the text.

  Raises:
    UserError: a sampling option out of range, or an empty prompt.
  """
  check_options(max_tokens, top_p, temperature)
  tok = model.tokenizer
  ids = (list(prompt) if not isinstance(prompt, str) else
         tokenizer_lib.encode_documents(tok, [(prompt, False)]).tolist())
  if not ids:
    raise errors.UserError("--prompt is empty; give some text to continue")
  cfg = model.cfg
  total = len(ids) + max_tokens
  dtype = jnp.dtype(cfg.dtype)
  caches = [model_lib.KVCache(*(jnp.zeros((1, total, cfg.n_kv_heads, cfg.head_dim),
                                          dtype) for _ in range(2)))
            for _ in range(cfg.n_layers)]

  key = jax.random.key(seed)
  logits_V, caches = _forward(model.graphdef, model.params,
                              jnp.asarray([ids], jnp.int32), caches, jnp.int32(0))
  tokens, logits = [], []
  for i in range(max_tokens):
    token = int(_pick(logits_V, jax.random.fold_in(key, i), top_p, temperature))
    tokens.append(token)
    logits.append(np.asarray(logits_V))
    if (stop_at_eos and token == tok.eos_id()) or i == max_tokens - 1:
      break
    logits_V, caches = _forward(model.graphdef, model.params,
                                jnp.asarray([[token]], jnp.int32), caches,
                                jnp.int32(len(ids) + i))
  text_ids = tokens[:-1] if tokens and tokens[-1] == tok.eos_id() else tokens
  return Output(tokens, np.stack(logits), tok.decode(text_ids))


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that
  importing this module beside train.export defines no flag twice)."""
  flags.DEFINE_string("workdir", None, "Run directory of `python -m train`.")
  flags.DEFINE_string("prompt", None, "Text to continue.")
  flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate.")
  flags.DEFINE_float("top_p", 0.0, "0: greedy; in (0, 1]: sample from the top-p nucleus.")
  flags.DEFINE_float("temperature", 1.0, "Divides the logits before top-p sampling.")
  flags.DEFINE_integer("seed", 0, "Seed of the top-p draws.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_string("tokenizer", "",
                      "Tokenizer file; default the run's WORKDIR/tokenizer.model.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if not f.workdir or f.prompt is None:
    print('error: --workdir and --prompt are required, e.g. python -m '
          'train.generate --workdir runs/tiny --prompt "KING:"', file=sys.stderr)
    sys.exit(errors.EXIT_STATUS)
  try:
    check_options(f.max_tokens, f.top_p, f.temperature)
    model = load(f.workdir, f.step, f.tokenizer)
    out = generate(model, f.prompt, max_tokens=f.max_tokens, top_p=f.top_p,
                   temperature=f.temperature, seed=f.seed)
  except errors.UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(errors.EXIT_STATUS)
  print(f.prompt + out.text, flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

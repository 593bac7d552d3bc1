"""LLaMA-7B on a 12 GB device: APOLLO-Mini with int8 kernels, layer-wise.

APOLLO-Mini keeps a rank-1 Adam state per kernel (its projection is
regenerated from a seed), so the weights are what is left: the blocks'
kernels in int8 (`model.kernel_format="int8"`: one int8 code per weight and
one float32 scale per 256 values of a row, dequantized one layer at a time
and re-quantized after each update with unbiased stochastic rounding), the
embedding, head and norms in bfloat16 with their Adam moments in bfloat16.
Batch 16 x 256, every layer updated inside the backward scan.

The memory breakdown (`python -m train --config configs/llama_7b_12gb.py
--dry_run --target=h100`, XLA's GPU compiler) is in docs/trainer.md ("int8 kernels").
"""

from configs import llama_7b


def apollo_mini_int8(cfg):
  """`cfg` as APOLLO-Mini, layer-wise, int8 kernels, bf16 rest, one device, batch 16 (in place)."""
  cfg.batch_size = 16
  cfg.mesh.data = 1  # one device
  cfg.opt.name = "apollo_mini"
  cfg.opt.learning_rate = 1e-2  # APOLLO-Mini's 7B learning rate
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.model.kernel_format = "int8"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg


def get_config():
  """configs/llama_7b.py as APOLLO-Mini, layer-wise, int8 kernels, bf16 rest, batch 16."""
  return apollo_mini_int8(llama_7b.get_config())

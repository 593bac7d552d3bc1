"""LLaMA-7B on a 16 GB device: SubTrack++ rank 1024 with int8 kernels and bases.

SubTrack++ at the paper's rank 1024, batch 16 x 256, layer-wise updates,
8-bit moments (the embedding's and head's included), bfloat16 embedding and
head (`configs.base.memory_saving`, as configs/llama_7b_2k_24gb.py at
16 x 256); what it adds:

* `model.kernel_format="int8"`: the blocks' kernels (6.5B of the 6.7B
  weights) are stored as int8 codes with one float32 scale per 256 values of
  a row, dequantized one layer at a time inside the scans and re-quantized
  after each update with unbiased stochastic rounding;
* `opt.basis_dtype="int8"`: the 224 bases (0.9B values at rank 1024) in
  8-bit blocks, used in float32 and rounded once per refresh.

The memory breakdown (`python -m train --config configs/llama_7b_16gb.py
--dry_run --target=h100`, XLA's GPU compiler) is in docs/trainer.md ("int8 kernels").
"""

from configs import base
from configs import llama_7b


def get_config():
  """configs/llama_7b.py the memory-saving way (SubTrack++ rank 1024, batch 16), int8 kernels and bases."""
  cfg = base.memory_saving(llama_7b.get_config())
  cfg.batch_size = 16
  cfg.mesh.data = 1  # one device
  cfg.model.kernel_format = "int8"
  cfg.opt.basis_dtype = "int8"
  return cfg

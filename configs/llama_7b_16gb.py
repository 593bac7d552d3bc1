"""LLaMA-7B on a 16 GB device: configs/llama_7b_24gb.py with int8 kernels.

SubTrack++ at the paper's rank 1024, batch 16 x 256, layer-wise updates,
8-bit moments, bfloat16 bases, embedding and head; what changes from the
24 GB preset is `model.kernel_format="int8"`: the blocks' kernels (6.5B of
the 6.7B weights) are stored as int8 codes with one float32 scale per 256
values of a row, dequantized one layer at a time inside the scans and
re-quantized after each update with unbiased stochastic rounding.

The memory breakdown (`python -m train --config configs/llama_7b_16gb.py
--dry_run --target=h100`, XLA's GPU compiler) is in docs/int8.md.
"""

from configs import llama_7b_24gb


def get_config():
  """configs/llama_7b_24gb.py (SubTrack++ rank 1024, batch 16) with int8 kernels."""
  cfg = llama_7b_24gb.get_config()
  cfg.model.kernel_format = "int8"
  return cfg

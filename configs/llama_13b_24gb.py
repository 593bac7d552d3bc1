"""LLaMA-13B on a 24 GB device: APOLLO-Mini with int8 kernels, layer-wise.

configs/llama_7b_12gb.py's recipe at the 13B shape of configs/llama_13b.py:
the blocks' kernels in int8 (`model.kernel_format="int8"`, one float32 scale
per 256 values of a row, stochastic rounding of each update), the embedding,
head and norms in bfloat16 with bfloat16 Adam moments, a rank-1 APOLLO-Mini
state per kernel, every layer updated inside the backward scan. Batch
16 x 256.

The memory breakdown (`python -m train --config configs/llama_13b_24gb.py
--dry_run --target=h100`, XLA's GPU compiler) is in docs/trainer.md ("int8 kernels").
"""

from configs import llama_13b
from configs import llama_7b_12gb


def get_config():
  """configs/llama_13b.py as APOLLO-Mini, layer-wise, int8 kernels, bf16 rest, batch 16."""
  return llama_7b_12gb.apollo_mini_int8(llama_13b.get_config())

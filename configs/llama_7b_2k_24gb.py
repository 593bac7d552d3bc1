"""LLaMA-7B on a 24 GB device at sequences of 2048 tokens.

SubTrack++ at rank 1024 with layer-wise updates, bf16 weights and 8-bit
moments (`configs.base.memory_saving`, as configs/llama_7b_24gb.py), trained
on 2 sequences of 2048 tokens per step: 4096 tokens per step, at the context
length of LLaMA-1/2 pretraining. `model.attention="auto"` picks the blockwise
attention at this length (train/attention.py), so attention costs blocks of
512 x 512 scores, not 2048 x 2048. Compiled for an H100 by XLA's GPU
compiler (`python -m train --config configs/llama_7b_2k_24gb.py --dry_run
--target=h100`): about 21 GiB for the ordinary step and 21.8 GiB for the
refresh step, of which 12.6 GiB are weights and 5.8 GiB optimizer state
(docs/results.md has the breakdown).
"""

from configs import base
from configs import llama_7b


def get_config():
  """configs/llama_7b.py the memory-saving way, at batch 2 x 2048."""
  cfg = base.memory_saving(llama_7b.get_config())
  cfg.batch_size = 2
  cfg.seq_len = 2048
  cfg.mesh.data = 1  # one device
  return cfg

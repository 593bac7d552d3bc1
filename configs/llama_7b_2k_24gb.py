"""LLaMA-7B on a 24 GB device at sequences of 2048 tokens.

configs/llama_7b_24gb.py (SubTrack++ rank 1024, layer-wise, bf16 weights,
8-bit moments) trained on 2 sequences of 2048 tokens per step instead of 16
of 256: the same 4096 tokens per step, at the context length of LLaMA-1/2
pretraining. `model.attention="auto"` picks the blockwise attention at this
length (train/attention.py), so attention costs blocks of 512 x 512 scores,
not 2048 x 2048. Compiled for an H100 by XLA's GPU compiler (`python -m train
--config configs/llama_7b_2k_24gb.py --dry_run --target=h100`): about 21 GiB
for the ordinary step and 21.8 GiB for the refresh step, the 12.6 GiB of
weights and 5.8 GiB of optimizer state of the 24 GB preset plus activations
that grow linearly with the length (docs/results.md has the breakdown).
"""

from configs import llama_7b_24gb


def get_config():
  """configs/llama_7b_24gb.py at batch 2 x 2048."""
  cfg = llama_7b_24gb.get_config()
  cfg.batch_size = 2
  cfg.seq_len = 2048
  return cfg

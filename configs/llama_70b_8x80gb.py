"""LLaMA-2-70B shapes on one host of 8 x 80 GB GPUs: SubTrack++, layer-wise, fsdp 8.

The shapes of LLaMA-2-70B (80 layers, d_model 8192, d_ff 28672, 64 query
heads sharing 8 key/value heads, vocabulary 32000) trained on sequences of
4096 tokens, one per device. Compiled for eight H100s by XLA's GPU compiler
(`python -m train --config configs/llama_70b_8x80gb.py --dry_run
--target=h100x8`); docs/results.md has the measured per-device breakdown and
AdamW on the same mesh beside it. What it sets:

* `mesh.fsdp=8`: parameters, optimizer state and batch split over the eight
  devices (each device gathers one layer's weights at a time inside the scan);
* `configs.base.memory_saving`: `opt.layerwise=True`, every layer is updated inside the backward scan, so
  no program holds the model's gradient;
* rank 2048, a quarter of d_model as in the GaLore / SubTrack++ 1B and 7B
  runs. The key and value kernels (8192 x 1024) have no side above the
  rank, so they keep plain Adam moments, and the run says so in one note;
* `model.param_dtype=bfloat16` with stochastic rounding, the reduced moments
  in 8 bits (`opt.subtrack.quantize_moments="quantile"`), the bases and the
  unprojected leaves' moments in bfloat16;
* `model.attention="blockwise"`: attention memory linear in the sequence
  length (train/attention.py), so a 4096-token sequence costs blocks of
  512 x 512 scores instead of 4096 x 4096.

No GaLore / SubTrack++ run trained this size: the learning rate and the
refresh interval are those of configs/llama_7b.py.
"""

from configs import base


def get_config():
  """LLaMA-2-70B shapes, SubTrack++ rank 2048, layer-wise, bf16, fsdp 8, batch 8 x 4096."""
  cfg = base.llama_config(d_model=8192, n_layers=80, n_heads=64, d_ff=28672, rank=2048,
                          learning_rate=1e-4, update_interval=500)
  cfg.model.n_kv_heads = 8
  cfg.batch_size = 8
  cfg.seq_len = 4096
  cfg.mesh.data = 1
  cfg.mesh.fsdp = 8
  cfg.model.attention = "blockwise"
  return base.memory_saving(cfg)

"""LLaMA-1B of the GaLore / SubTrack++ C4 runs, trained with SubTrack++."""

from configs import base


def get_config():
  """d_model 2048, 24 layers, 32 heads, d_ff 5461; rank 512, lr 1e-4, refresh every 200."""
  return base.llama_config(d_model=2048, n_layers=24, n_heads=32, d_ff=5461, rank=512,
                           learning_rate=1e-4, update_interval=200)

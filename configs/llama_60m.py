"""LLaMA-60M of the GaLore / SubTrack++ C4 runs, trained with SubTrack++."""

from configs import base


def get_config():
  """d_model 512, 8 layers, 8 heads, d_ff 1376; rank 128, lr 1e-2, refresh every 200."""
  return base.llama_config(d_model=512, n_layers=8, n_heads=8, d_ff=1376, rank=128,
                           learning_rate=1e-2, update_interval=200)

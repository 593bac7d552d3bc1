"""LLaMA-130M of the GaLore / SubTrack++ C4 runs, trained with SubTrack++."""

from configs import base


def get_config():
  """d_model 768, 12 layers, 12 heads, d_ff 2048; rank 256, lr 1e-2, refresh every 200."""
  return base.llama_config(d_model=768, n_layers=12, n_heads=12, d_ff=2048, rank=256,
                           learning_rate=1e-2, update_interval=200)

"""LLaMA-7B of the GaLore / SubTrack++ C4 runs, trained with SubTrack++."""

from configs import base


def get_config():
  """d_model 4096, 32 layers, 32 heads, d_ff 11008; rank 1024, lr 1e-4, refresh every 500."""
  return base.llama_config(d_model=4096, n_layers=32, n_heads=32, d_ff=11008, rank=1024,
                           learning_rate=1e-4, update_interval=500)

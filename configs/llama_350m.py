"""LLaMA-350M of the GaLore / SubTrack++ C4 runs, trained with SubTrack++."""

from configs import base


def get_config():
  """d_model 1024, 24 layers, 16 heads, d_ff 2736; rank 256, lr 1e-2, refresh every 200."""
  return base.llama_config(d_model=1024, n_layers=24, n_heads=16, d_ff=2736, rank=256,
                           learning_rate=1e-2, update_interval=200)

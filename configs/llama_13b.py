"""LLaMA-13B shape (d_model 5120, 40 layers, 40 heads, d_ff 13824), SubTrack++.

No GaLore / SubTrack++ run trained this size; the learning rate, rank and
refresh interval are those of configs/llama_7b.py. Mostly for memory: e.g.
`python -m train --config configs/llama_13b.py --dry_run`.
"""

from configs import base


def get_config():
  """d_model 5120, 40 layers, 40 heads, d_ff 13824; rank 1024, lr 1e-4, refresh every 500."""
  return base.llama_config(d_model=5120, n_layers=40, n_heads=40, d_ff=13824, rank=1024,
                           learning_rate=1e-4, update_interval=500)

"""Default preset: a 7M-parameter LLaMA that trains on a 2-core CPU in minutes."""

from configs import base


def get_config():
  """d_model 256, 4 layers, vocab 8192, seq 256, batch 8, SubTrack++ rank 64."""
  return base.get_base_config()

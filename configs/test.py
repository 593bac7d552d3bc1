"""Test preset: a 2-layer, d_model 32 LLaMA on your own small text, in seconds.

Set `data.files` (and `data.dir` for the cache) before running it.
"""

from configs import base


def get_config():
  """d_model 32, 2 layers, seq 64, batch 8, vocab 320; one device; SubTrack++ rank 8."""
  cfg = base.get_base_config()
  cfg.steps = 30
  cfg.batch_size = 8
  cfg.seq_len = 64
  cfg.eval_every = 10
  cfg.eval_batches = 2
  cfg.checkpoint_every = 10
  cfg.opt.learning_rate = 1e-2
  cfg.opt.warmup_steps = 1
  cfg.opt.rank = 8
  cfg.opt.update_interval = 10
  cfg.model.d_model = 32
  cfg.model.n_layers = 2
  cfg.model.n_heads = 4
  cfg.model.d_ff = 96
  cfg.mesh.data = 1
  cfg.data.corpus = "text_files"
  cfg.data.vocab_size = 320
  cfg.data.eval_fraction = 0.1
  return cfg

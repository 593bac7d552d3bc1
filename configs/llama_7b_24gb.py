"""LLaMA-7B on a 24 GB device: SubTrack++ at rank 1024, the memory-saving way.

It trains micro-batches of 16 sequences of 256 tokens, as GaLore's 24 GB
script does. Compiled for an H100 by XLA's GPU compiler (`python -m train
--config configs/llama_7b_24gb.py --dry_run --target=h100`), the ordinary
step and the refresh step each peak at about 21 GiB: 12.6 GiB of bfloat16
weights, 5.8 GiB of optimizer state, the rest activations and one layer's
gradient (docs/results.md has the measured breakdown). What it changes from
configs/llama_7b.py:

* `opt.layerwise=True`: every layer is updated inside the backward scan, so
  only one layer's gradient exists (not the model's 6.7B-value gradient);
* `model.param_dtype=bfloat16`: 2-byte weights, updated with unbiased
  stochastic rounding (`opt.stochastic_rounding`, on for bf16 weights);
* `opt.subtrack.quantize_moments="quantile"`: the reduced Adam moments in 8
  bits (blocks of 256 values, one float32 scale each);
* `opt.basis_dtype=bfloat16`: the tracked bases in 2 bytes, as GaLore's 8-bit
  runs keep their projectors in the gradients' dtype;
* `opt.mu_dtype=opt.nu_dtype=bfloat16`: the embedding's and the head's Adam
  moments (they are not projected) in 2 bytes.

A layer-wise step cannot accumulate micro-batches: each step trains one batch
of 16 x 256 tokens. Learning rate, rank and refresh interval are the 7B
preset's.
"""

from configs import llama_7b


def get_config():
  """configs/llama_7b.py with layer-wise updates, bf16 weights, 8-bit moments, batch 16."""
  cfg = llama_7b.get_config()
  cfg.batch_size = 16
  cfg.mesh.data = 1  # one device
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.opt.subtrack.quantize_moments = "quantile"
  cfg.opt.basis_dtype = "bfloat16"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg

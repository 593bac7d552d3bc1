"""LLaMA-7B on a 24 GB device: SubTrack++ at rank 1024, the memory-saving way.

What it changes from configs/llama_7b.py, each with what it saves at batch
1 x 256 (`python -m train --config configs/llama_7b_24gb.py --dry_run`; the
README's "How big a model fits" has the measured breakdown):

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

One sequence of 256 tokens per step (a layer-wise step cannot accumulate
micro-batches); learning rate, rank and refresh interval are the 7B preset's.
"""

from configs import llama_7b


def get_config():
  """configs/llama_7b.py with layer-wise updates, bf16 weights, 8-bit moments, batch 1."""
  cfg = llama_7b.get_config()
  cfg.batch_size = 1
  cfg.mesh.data = 1  # one device
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.opt.subtrack.quantize_moments = "quantile"
  cfg.opt.basis_dtype = "bfloat16"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg

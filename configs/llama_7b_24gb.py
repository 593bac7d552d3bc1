"""LLaMA-7B on a 24 GB device: SubTrack at rank 512, 131k tokens per step.

It trains 32 micro-batches of 16 sequences of 256 tokens (131,072 tokens) per
optimizer step, accumulated in the reduced space. Compiled for an H100 by
XLA's GPU compiler (`python -m train --config configs/llama_7b_24gb.py
--dry_run --target=h100`), the ordinary step peaks at 20.2 GiB and the
refresh step at 20.4 GiB: 12.6 GiB of bfloat16 weights, 3.4 GiB of optimizer
state, 2.0 GiB of micro-batch accumulators, the rest activations and one
layer's gradient. What it changes from configs/llama_7b.py:

* `opt.layerwise=True`: every layer is updated inside the backward scan, so
  only one layer's gradient exists (not the model's 6.7B-value gradient);
* `grad_accum=32`, `batch_size=512`: each micro-batch's backward scan adds
  every layer's reduced gradients (r x D per matrix) into accumulators, and
  one step is taken from their mean (docs/trainer.md, "Micro-batches in the
  reduced space"); the new subspaces of a refresh step come from the first
  micro-batch;
* `opt.subtrack.recovery=False`: SubTrack without the "++" recovery term,
  which needs the whole batch's full gradient;
* `opt.rank=512`: the accumulators and the reduced moments at rank 1024 do
  not fit together (24.3 GiB);
* `model.param_dtype=bfloat16`: 2-byte weights, updated with unbiased
  stochastic rounding (`opt.stochastic_rounding`, on for bf16 weights);
* `opt.subtrack.quantize_moments="quantile"`: the reduced Adam moments in 8
  bits (blocks of 256 values, one float32 scale each);
* `opt.basis_dtype=bfloat16`: the tracked bases in 2 bytes, as GaLore's 8-bit
  runs keep their projectors in the gradients' dtype;
* `opt.mu_dtype=opt.nu_dtype=bfloat16`: the embedding's and the head's Adam
  moments (they are not projected) in 2 bytes.

Learning rate and refresh interval are the 7B preset's.
"""

from configs import base
from configs import llama_7b


def get_config():
  """configs/llama_7b.py layer-wise, bf16, 8-bit moments, rank 512, 32 x 16 x 256 tokens."""
  cfg = base.memory_saving(llama_7b.get_config())
  cfg.batch_size = 512
  cfg.grad_accum = 32
  cfg.opt.rank = 512
  cfg.opt.subtrack.recovery = False
  cfg.mesh.data = 1  # one device
  return cfg

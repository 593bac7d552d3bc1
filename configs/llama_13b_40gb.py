"""LLaMA-13B on a 40 GB device: GRASS in its sparse-gradient mode, in bf16.

The 13B shape of configs/llama_13b.py trained the way GRASS trains large
models on one device (`python -m train --config configs/llama_13b_40gb.py
--dry_run`; the README's "How big a model fits" has the measured breakdown):

* `opt.name="grass"`, `opt.subspace_layers=True`: every attention and MLP
  kernel is frozen between refreshes and trains through an r x D delta on r
  selected rows, so the step computes only r x D weight gradients;
* `opt.layerwise=True`: each layer is updated inside the backward scan, and
  the refresh (merge, new rows from the merged weights' gradient) runs layer
  by layer too, so no program holds a full-size gradient;
* `model.param_dtype=bfloat16` with stochastic rounding, and the deltas'
  Adam moments in bfloat16 (`opt.mu_dtype`, `opt.nu_dtype`);
* `grad_accum=128`, `batch_size=512`: 128 micro-batches of 4 sequences of
  256 tokens (131,072 tokens) per optimizer step; the deltas' gradients
  (already r x D) are accumulated layer by layer, and the refresh picks the
  new rows from the first micro-batch (docs/trainer.md, "Micro-batches in
  the reduced space");
* rank 256: the deltas' accumulators fit beside the weights (H100 compiler:
  the step peaks at 32.2 GiB, the refresh at 29.5 GiB).

The learning rate and refresh interval are those of configs/llama_13b.py.
"""

from configs import llama_13b


def get_config():
  """configs/llama_13b.py as GRASS sparse-gradient layers, layer-wise, bf16, rank 256, 128 x 4 x 256 tokens."""
  cfg = llama_13b.get_config()
  cfg.batch_size = 512
  cfg.grad_accum = 128
  cfg.mesh.data = 1  # one device
  cfg.opt.name = "grass"
  cfg.opt.rank = 256
  cfg.opt.subspace_layers = True
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg

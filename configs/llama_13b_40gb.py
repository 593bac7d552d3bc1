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
* rank 512 (at rank 256 with float32 moments the step needs about 32 GiB).

One sequence of 256 tokens per step; the learning rate and refresh interval
are those of configs/llama_13b.py.
"""

from configs import llama_13b


def get_config():
  """configs/llama_13b.py as GRASS sparse-gradient layers, layer-wise, bf16, rank 512, batch 1."""
  cfg = llama_13b.get_config()
  cfg.batch_size = 1
  cfg.mesh.data = 1  # one device
  cfg.opt.name = "grass"
  cfg.opt.rank = 512
  cfg.opt.subspace_layers = True
  cfg.opt.layerwise = True
  cfg.model.param_dtype = "bfloat16"
  cfg.opt.mu_dtype = "bfloat16"
  cfg.opt.nu_dtype = "bfloat16"
  return cfg

"""A Flax NNX LLaMA pretraining stack for the subspax optimizers.

Run `python -m train --config configs/<preset>.py`; see `train/__main__.py`.

Importing the package pins OpenBLAS to one thread unless the environment
sets it: jaxlib's CPU LAPACK kernels (the SVD, QR and eigh of a subspace
refresh) already run a batch in parallel, and nested OpenBLAS threads
busy-wait and made a refresh of stacked (L, m, n) kernels ~100x slower on 2
cores. Every entry point (`python -m train`, `python -m train.export`,
`python -m train.generate`, `python -m bench.<name>`, the tests' conftest) imports this package before
numpy or jax load, and nothing here imports either.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

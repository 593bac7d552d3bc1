"""Benchmarks of the subspax optimizers; run each as `python -m bench.<name>`.

Importing the package pins OpenBLAS to one thread before JAX loads: jaxlib's
CPU LAPACK kernels already run in parallel, and nested OpenBLAS threads make
a QR / SVD refresh up to ~100x slower on a 2-core machine.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

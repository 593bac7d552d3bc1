"""Benchmarks of the subspax optimizers; run each as `python -m bench.<name>`.

Importing the package imports `train` first, which pins OpenBLAS to one
thread before JAX loads (train/__init__.py): jaxlib's CPU LAPACK kernels
already run in parallel, and nested OpenBLAS threads make a QR / SVD refresh
up to ~100x slower on a 2-core machine.
"""

import train  # pylint: disable=unused-import

"""Session-wide pytest setup, applied before anything imports numpy or jax.

8 fake CPU devices; single-threaded OpenBLAS (jaxlib's batched CPU LAPACK
kernels are already parallel, and nested OpenBLAS threads make them ~100x
slower on a 2-core machine); the repo root on sys.path for `train`, `configs`.
"""

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

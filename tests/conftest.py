"""Session-wide pytest setup, applied before anything imports numpy or jax.

8 fake CPU devices on the CPU backend (JAX_PLATFORMS=cpu: the test extra
installs jax's CUDA plugin for the deviceless GPU compiles of
tests/test_gpu_compile.py, and it must not look for a GPU); single-threaded OpenBLAS (importing `train` sets it,
train/__init__.py: jaxlib's batched CPU LAPACK kernels are already parallel,
and nested OpenBLAS threads make them ~100x slower on a 2-core machine); the
repo root on sys.path for `train`, `configs`.
"""

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import train  # pylint: disable=unused-import  # pins OpenBLAS (train/__init__.py)

import random

# Scripts that record fixtures (some need torch); `--doctest-modules` would
# import them as test modules.
collect_ignore = ["fixtures"]

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A ~120 kB generated English-like text file and a data cache directory."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  words = ("the of and to in a is that for it as was with be by on not he this "
           "are or his from at which but have an they you were her she there had "
           "all one their king love night sweet lord heart").split()
  path = root / "text.txt"
  with open(path, "w") as f:
    for _ in range(3000):
      line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
      f.write(line.capitalize() + ".\n")
  return {"data.files": str(path), "data.dir": str(root / "cache")}

#!/usr/bin/env bash
# Runs the whole test suite (tests/ and the docstring examples of subspax/)
# on CPU with 8 fake devices, in 2 worker processes. Installs everything into
# .venv first.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv test "subspax, jax_plugins.xla_cuda12, chex, flax, orbax.checkpoint, grain, tensorflow_datasets, sentencepiece, ml_collections, safetensors, tokenizers, tensorboardX, pytest, xdist, hypothesis"
exec .venv/bin/python -m pytest -q -n 2 --doctest-modules subspax tests "$@"

#!/usr/bin/env bash
# Runs the tests on CPU with 8 fake devices, in 2 worker processes, after
# installing everything into .venv (first run only).
#   bash scripts/run_tests.sh                          # the whole suite: tests/ and subspax's doctests
#   bash scripts/run_tests.sh tests/test_cli.py        # one file
#   bash scripts/run_tests.sh tests/test_cli.py -k resume -n 0
# Arguments are pytest's: with any, only what they name runs.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv test,gpu-compile "subspax, jax_plugins.xla_cuda12, chex, flax, orbax.checkpoint, grain, tensorflow_datasets, sentencepiece, ml_collections, safetensors, tokenizers, tensorboardX, pytest, xdist, hypothesis"
if [ $# -eq 0 ]; then
  set -- subspax tests
fi
exec .venv/bin/python -m pytest -q -n 2 --doctest-modules "$@"

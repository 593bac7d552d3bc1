#!/usr/bin/env bash
# Pretrains the default preset (configs/tiny.py: a small LLaMA with SubTrack++
# on Shakespeare and Milton) on CPU. Installs everything into .venv first.
# Any argument is passed to `python -m train`, e.g. --config.opt.name=adamw.
# Relative paths (--workdir, --config.data.files, ...) are relative to the
# directory you run this from, not to the repository.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# ensure_venv works in the repository root: a subshell keeps the caller's directory.
(source "${root}/scripts/_venv.sh"
 ensure_venv train "subspax, flax, orbax.checkpoint, grain, tensorflow_datasets, sentencepiece, ml_collections, safetensors, tokenizers, tensorboardX, tqdm, matplotlib")
# The CPU backend (also where the test extra's CUDA compiler plugin is installed).
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}" exec "${root}/.venv/bin/python" -m train "$@"

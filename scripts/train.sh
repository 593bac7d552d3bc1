#!/usr/bin/env bash
# Pretrains the default preset (configs/tiny.py: a small LLaMA with SubTrack++
# on Shakespeare and Milton) on CPU. Installs everything into .venv first.
# Any argument is passed to `python -m train`, e.g. --config.opt.name=adamw.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv train "subspax, flax, orbax.checkpoint, grain, tensorflow_datasets, sentencepiece, ml_collections, safetensors, tokenizers, tensorboardX, tqdm, matplotlib"
exec .venv/bin/python -m train "$@"

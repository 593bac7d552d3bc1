#!/usr/bin/env bash
# Runs the library tests (subspax's doctests, the optimizer tests and the model
# test) on the newest releases of jax, optax, flax and orbax-checkpoint, which
# need Python >= 3.12, in .venv312 (made and upgraded on every run; nothing is
# locked here). The Python comes from $PYTHON312, else `python3.12`, else pyenv
# (`PYENV_VERSION=3.12.1 python`). Without a Python 3.12 it fails, unless
# SUBSPAX_SKIP_NEWEST=1, which skips it with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidate
  for candidate in "${PYTHON312:-}" python3.12 \
      "$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/3.12.1/bin/python")"; do
    if [ -n "${candidate}" ] && "${candidate}" -c \
        'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "${candidate}"
      return
    fi
  done
  if PYENV_VERSION=3.12.1 python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PYENV_VERSION=3.12.1 python -c 'import sys; print(sys.executable)'
  fi
}

python312=$(find_python312)
if [ -z "${python312}" ]; then
  if [ "${SUBSPAX_SKIP_NEWEST:-0}" = 1 ]; then
    echo "SKIPPED: no Python 3.12 found, so the library tests on the newest jax did not run (SUBSPAX_SKIP_NEWEST=1)"
    exit 0
  fi
  echo "error: the newest jax needs Python 3.12 and none was found; install it (e.g. pyenv install 3.12.1), point PYTHON312 at one, or set SUBSPAX_SKIP_NEWEST=1 to skip this leg" >&2
  exit 1
fi

if [ ! -x .venv312/bin/python ]; then
  "${python312}" -m venv .venv312
fi
echo "Installing subspax[test] with the newest jax, optax, flax and orbax-checkpoint into .venv312..."
.venv312/bin/python -m pip install -q --upgrade pip
.venv312/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
    ".[test]" jax optax flax orbax-checkpoint
.venv312/bin/python -m pip check
.venv312/bin/python -c 'import sys, jax, optax, flax, orbax.checkpoint as ocp
print("python", sys.version.split()[0], "jax", jax.__version__, "optax", optax.__version__,
      "flax", flax.__version__, "orbax-checkpoint", ocp.__version__)'
# The library tests: the optimizers' properties, the shared optax table, the
# equality of the update loop with its recorded reference, the authors'
# reference fixtures, and the model (flax). The rest of the suite runs in the
# first leg; keeping this leg short keeps CI within its time budget.
exec .venv312/bin/python -m pytest -q -n 2 -p no:cacheprovider --doctest-modules \
    subspax tests/test_properties.py tests/test_optax_table.py \
    tests/test_update_memory.py tests/test_apollo_fira.py tests/test_model.py "$@"

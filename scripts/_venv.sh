# Sourced by the scripts in this folder: makes .venv with the given extras.
# Usage: ensure_venv EXTRAS MODULES  (reinstalls only when an import fails).
ensure_venv() {
  local extras=$1 modules=$2
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c "import ${modules}" 2>/dev/null; then
    echo "Installing subspax[${extras}] into .venv (first run only)..."
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[${extras}]"
  fi
}

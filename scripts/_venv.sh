# Sourced by the scripts in this folder: makes .venv with the given extras.
# Usage: ensure_venv EXTRAS MODULES  (reinstalls only when an import fails).
# On a Python with a lock file, constraints/py<major><minor>.txt (3.11: the
# versions CI tests), the install is pinned to it; elsewhere pip resolves the
# newest versions within pyproject.toml's lower bounds.
ensure_venv() {
  local extras=$1 modules=$2
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if ! .venv/bin/python -c "import ${modules}" 2>/dev/null; then
    local lock
    lock="constraints/py$(.venv/bin/python -c 'import sys; print("%d%d" % sys.version_info[:2])').txt"
    local pin=()
    if [ -f "${lock}" ]; then
      pin=(-c "${lock}")
      echo "Installing subspax[${extras}] into .venv with the versions of ${lock} (first run only)..."
    else
      echo "Installing subspax[${extras}] into .venv (first run only; no lock file for this Python, so the newest versions)..."
    fi
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${pin[@]}" -e ".[${extras}]"
  fi
}

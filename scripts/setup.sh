#!/usr/bin/env bash
# Set up everything dlgraph needs: system packages (clang for tinygrad's CPU backend,
# graphviz for drawings) and a virtual environment in .venv with the package installed.
# Usage: scripts/setup.sh [extra]   (extra: "test" adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]} — install them (e.g. sudo apt-get install ${missing[*]}) and run this again" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: dlgraph needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$extra" = test ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi

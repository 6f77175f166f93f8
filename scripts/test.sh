#!/usr/bin/env bash
# Install token-broker with its test extra into a fresh virtualenv, then run
# the linters, the type checker and the whole test suite (with coverage).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet ".[test]"

"$venv/bin/ruff" check broker tests bench
"$venv/bin/ruff" format --check broker tests bench
"$venv/bin/mypy"

"$venv/bin/python" -m coverage erase
"$venv/bin/python" -m coverage run -m pytest "$@"
"$venv/bin/python" -m coverage combine --quiet || true
"$venv/bin/python" -m coverage report

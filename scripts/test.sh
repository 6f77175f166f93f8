#!/usr/bin/env bash
# Install everything the tests need, then run the linters, the type checker
# and the whole test suite (with coverage):
# - token-broker with its test extra, in a fresh virtualenv (.venv);
# - the test peer, npm oidc-provider pinned by tests/peer/package-lock.json,
#   a real third-party OAuth server the interoperability tests talk to.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in python3 node npm; do
    if ! command -v "$tool" >/dev/null; then
        echo "scripts/test.sh: '$tool' is not installed; the tests need it" >&2
        exit 1
    fi
done

venv=${VENV:-.venv}
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet ".[test]"
echo "== test peer: node $(node --version), npm $(npm --version)"
npm ci --prefix tests/peer --no-audit --no-fund --loglevel=error

"$venv/bin/ruff" check broker tests bench
"$venv/bin/ruff" format --check broker tests bench
"$venv/bin/mypy"

"$venv/bin/python" -m coverage erase
"$venv/bin/python" -m coverage run -m pytest "$@"
"$venv/bin/python" -m coverage combine --quiet || true
"$venv/bin/python" -m coverage report

#!/usr/bin/env bash
# Set up .venv with the test dependencies, then run what CI runs, in this order:
# format check, lint, type check, the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
echo "== installing edge-agent and its test dependencies"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 \
    | grep -v "^WARNING: Location" || true

# The systemd unit tests need systemd-analyze (and /bin/kill, for ExecReload); the install
# script's test runs shellcheck. Install Debian's packages when they are missing.
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
[ -x /bin/kill ] || missing+=(procps)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]}"
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1 || \
        echo "warning: could not install ${missing[*]}; the tests that need them say so"
fi

echo "== ruff format --check"
.venv/bin/ruff format --check agent tests scripts examples
echo "== ruff check"
.venv/bin/ruff check agent tests scripts examples
echo "== mypy (strict on agent/)"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"

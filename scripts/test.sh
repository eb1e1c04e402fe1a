#!/usr/bin/env bash
# Set up, lint, check formatting and run the test suite. This is the README's test command.
#
#   bash scripts/test.sh [PYTEST ARGS]            on the locked versions (.venv/)
#   bash scripts/test.sh --latest [PYTEST ARGS]   the suite on the newest allowed versions (.venv-latest/);
#                                                 lint runs on the locked ruff only, so a new ruff rule is not
#                                                 mistaken for upstream drift
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --latest ]; then
    shift
    bash scripts/setup.sh --latest
    .venv-latest/bin/python -m pytest -q "$@"
else
    bash scripts/setup.sh
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/python -m pytest -q "$@"
fi

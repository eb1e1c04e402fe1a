#!/usr/bin/env bash
# Set up, lint, check formatting and run the test suite. This is the README's test command.
#
#   bash scripts/test.sh [PYTEST ARGS]            on the locked versions (.venv/)
#   bash scripts/test.sh --latest [PYTEST ARGS]   the suite on the newest allowed versions (.venv-latest/);
#                                                 lint runs on the locked ruff only, so a new ruff rule is not
#                                                 mistaken for upstream drift
set -euo pipefail
cd "$(dirname "$0")/.."
# 2 worker processes (pytest-xdist), each on one thread (tests/conftest.py), a test file at a time, so that a
# module's expensive fixtures are built once (--dist loadgroup would group finer, but pytest 9.2 ignores the group
# names pytest-xdist 3.8 writes into node ids, so it silently degrades to --dist load)
parallel=(-n 2 --dist loadfile)
if [ "${1:-}" = --latest ]; then
    shift
    bash scripts/setup.sh --latest
    .venv-latest/bin/python -m pytest -q "${parallel[@]}" "$@"
else
    bash scripts/setup.sh
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/python -m pytest -q "${parallel[@]}" "$@"
fi

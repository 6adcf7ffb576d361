#!/usr/bin/env bash
# README's first command: set up (system packages, release build), then run the notebook's
# exercises in its order, as the notebook runs its three cells.
set -euo pipefail
cd "$(dirname "$0")/.."
Scripts/setup.sh
attn=.build/release/attn

echo "== Exercise 1: attention with dropout =="
"$attn" dropout --p 0.1

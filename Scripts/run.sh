#!/usr/bin/env bash
# README's first command: set up (system packages, release build), then run the notebook's three
# exercises in its order, as the notebook runs its three cells, and exercise 4 (the gradients).
# Figures go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
Scripts/setup.sh
attn=.build/release/attn
mkdir -p out

echo "== Exercise 1: attention with dropout =="
"$attn" dropout --p 0.1

echo
echo "== Exercise 2: attention complexity =="
"$attn" complexity --max-len 2048 --plot out/complexity.svg
echo "(figure: out/complexity.svg)"

echo
echo "== Exercise 3: relative position attention =="
"$attn" relpos --d-model 64

echo
echo "== Exercise 4 (beyond the notebook): the gradients of attention =="
"$attn" backward --p 0.1 --mask causal

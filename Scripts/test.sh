#!/usr/bin/env bash
# README's second command (and CI's): set up the system packages, then build and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
Scripts/setup.sh --no-build
# The same CPU flags as the release build, so the tests run the code users run.
mapfile -t flags < <(Scripts/build-flags.sh)
swift build --build-tests "${flags[@]}"
swift test --skip-build "${flags[@]}"

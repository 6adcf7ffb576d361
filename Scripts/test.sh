#!/usr/bin/env bash
# README's second command (and CI's): set up the system packages, then build and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
Scripts/setup.sh --no-build
swift build --build-tests
swift test --skip-build

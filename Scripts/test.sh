#!/usr/bin/env bash
# README's second command (and CI's): set up the system packages, check the formatting, build the
# documentation and a package that uses AttentionKit alone, then build and run every test (last,
# so that the test runner's summary closes the output).
set -euo pipefail
cd "$(dirname "$0")/.."
Scripts/setup.sh --no-build

echo "test: swift format lint --strict" >&2
swift format lint --strict -r Sources Tests Package.swift
Scripts/check-docs.sh
Scripts/check-consumer.sh

# The same CPU flags as the release build, so the tests run the code users run.
mapfile -t flags < <(Scripts/build-flags.sh)
swift build --build-tests "${flags[@]}"
swift test --skip-build "${flags[@]}"

#!/usr/bin/env bash
# Checks that a package depending on the AttentionKit product alone (Tests/Consumer) builds, links
# without LAPACKE, and computes attention through `Attention.scaledDotProduct`:
#
#   Scripts/check-consumer.sh
#
# Builds and runs Tests/Consumer's `consumer` (scratch path .build-consumer/, none of the root
# build's flags), which compares every kernel's output with its own Float64 computation and exits 1
# on a difference over 1e-5 or a thrown error; then lists the executable's shared libraries with
# ldd (direct and indirect) and fails if liblapacke is among them, or if libopenblas is not (then
# the listing itself is not to be trusted). Exit status 0 when all holds.
set -euo pipefail
cd "$(dirname "$0")/.."

package=(--package-path Tests/Consumer --scratch-path .build-consumer)

swift run "${package[@]}" consumer

binary=$(swift build "${package[@]}" --show-bin-path)/consumer
if [[ ! -x "$binary" ]]; then
  echo "check-consumer.sh: no executable at $binary" >&2
  exit 1
fi
libraries=$(ldd "$binary")
if grep -q 'liblapacke' <<<"$libraries"; then
  echo "check-consumer.sh: $binary links LAPACKE, which only attn should:" >&2
  grep 'liblapacke' <<<"$libraries" >&2
  exit 1
fi
if ! grep -q 'libopenblas' <<<"$libraries"; then
  echo "check-consumer.sh: ldd lists no libopenblas for $binary; cannot trust the list:" >&2
  echo "$libraries" >&2
  exit 1
fi
if grep -q 'not found' <<<"$libraries"; then
  echo "check-consumer.sh: $binary has unresolved libraries:" >&2
  grep 'not found' <<<"$libraries" >&2
  exit 1
fi
echo "check-consumer.sh: ok, $binary links OpenBLAS and not LAPACKE"

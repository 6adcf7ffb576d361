#!/usr/bin/env bash
# Fuzzes one of AttentionKit's file readers with libFuzzer.
#
#   Scripts/fuzz.sh npy|safetensors [SECONDS] [-- LIBFUZZER_FLAGS...]   fuzz (default 600 s)
#   Scripts/fuzz.sh npy|safetensors FILE...                             re-run saved inputs
#
# Builds Tests/Fuzz/Fuzz<Reader>.swift with the reader's sources (swiftc -sanitize=fuzzer,address -O;
# not a SwiftPM target) into .build-fuzz/, then runs it on a working corpus in
# .build-fuzz/<target>/corpus seeded from the committed Tests/Fuzz/corpus/<target> (new inputs go to
# the working corpus, never into the repository). A crash, an AddressSanitizer report, a hang
# over 10 s or an allocation over 64 MB (the inputs are at most 64 KiB, so a reader that needs
# more has trusted a size in a header) stops the run and saves the input under
# .build-fuzz/<target>/artifacts/. Each saved input then becomes a fixture and a test
# (Tests/AttentionKitTests/FuzzRegressionTests.swift). Exit status: libFuzzer's (0 = no finding).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '4,5p' "$0" | sed 's/^#  */usage: /' >&2
  exit 64
}

target=${1:-}
case "$target" in
  npy) entry=Tests/Fuzz/FuzzNPY.swift ;;
  safetensors) entry=Tests/Fuzz/FuzzSafeTensors.swift ;;
  *) usage ;;
esac
shift

# What the readers need from AttentionKit, and nothing that links OpenBLAS.
lib=Sources/AttentionKit
sources=(
  "$entry" "$lib/NPY.swift" "$lib/SafeTensors.swift" "$lib/HeaderJSON.swift"
  "$lib/HalfPrecision.swift" "$lib/AtomicFile.swift" "$lib/Tensor.swift" "$lib/AttentionError.swift"
)
work=.build-fuzz/$target
binary=$work/fuzz-$target
mkdir -p "$work/corpus" "$work/artifacts"

newest=$(ls -t "$binary" "${sources[@]}" "$0" 2>/dev/null | head -n 1 || true)
if [[ ! -x "$binary" || "$newest" != "$binary" ]]; then
  echo "fuzz.sh: building $binary" >&2
  swiftc -sanitize=fuzzer,address -parse-as-library -O -use-ld=lld \
    -module-name "Fuzz_$target" "${sources[@]}" -o "$binary"
fi

flags=(
  -timeout=10 -malloc_limit_mb=64 -max_len=65536 -print_final_stats=1
  "-dict=Tests/Fuzz/$target.dict" "-artifact_prefix=$work/artifacts/"
)

if [[ $# -gt 0 && ! "$1" =~ ^[0-9]+$ && "$1" != "--" ]]; then
  # Saved inputs (crash-…, leak-…, timeout-…): run each once and report.
  exec "$binary" "${flags[@]}" "$@"
fi

seconds=${1:-600}
[[ $# -gt 0 && "$1" != "--" ]] && shift
[[ "${1:-}" == "--" ]] && shift
exec "$binary" "${flags[@]}" -max_total_time="$seconds" "$@" "$work/corpus" "Tests/Fuzz/corpus/$target"

#!/usr/bin/env bash
# Fuzzes one of TensorIO's file readers with libFuzzer.
#
#   Scripts/fuzz.sh npy|safetensors [SECONDS] [-- LIBFUZZER_FLAGS...]   fuzz (default 600 s)
#   Scripts/fuzz.sh npy|safetensors FILE...                             re-run saved inputs
#
# Builds Tests/Fuzz/Fuzz<Reader>.swift (not a SwiftPM target) against the TensorIO target alone,
# into .build-fuzz/<target>/: every Sources/Tensors/**/*.swift becomes the module Tensors, every
# Sources/TensorIO/**/*.swift the module TensorIO (static libraries, instrumented with
# swiftc -sanitize=fuzzer,address -O so libFuzzer sees the readers' branches and comparisons and
# AddressSanitizer their memory accesses), and the entry file, which imports TensorIO and calls
# its public API, is linked against them. Nothing here links OpenBLAS. Each step is rebuilt only
# when one of its inputs (a source, a source folder, a module it imports, this script) is newer.
#
# It then runs on a working corpus in .build-fuzz/<target>/corpus seeded from the committed
# Tests/Fuzz/corpus/<target> (new inputs go to the working corpus, never into the repository).
# A crash, an AddressSanitizer report, a hang over 10 s or an allocation over 64 MB (the inputs
# are at most 64 KiB, so a reader that needs more has trusted a size in a header) stops the run
# and saves the input under .build-fuzz/<target>/artifacts/. Each saved input then becomes a
# fixture under Tests/_TestSupport/Fixtures/io (and a seed in Tests/Fuzz/corpus/<target>) and a
# test case in Tests/TensorIOTests (NPYTests.swift or SafeTensorsTests.swift) before it is fixed.
# Exit status: libFuzzer's (0 = no finding).
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

work=.build-fuzz/$target
modules=$work/modules
binary=$work/fuzz-$target
mkdir -p "$work/corpus" "$work/artifacts" "$modules"

# Instrumentation for every compile and the link. `-package-name` lets TensorIO use Tensors'
# `package` declarations, as in the SwiftPM build.
swift_flags=(-sanitize=fuzzer,address -O -g -parse-as-library -package-name attn -I "$modules")

# Whether `$1` is missing or older than any of the other arguments. The source folders are among
# the inputs, so adding, removing or renaming a source also triggers a rebuild.
stale() {
  local output=$1 input
  shift
  [[ -e "$output" ]] || return 0
  for input in "$@"; do
    [[ "$input" -nt "$output" ]] && return 0
  done
  return 1
}

# build_module NAME: Sources/NAME/**/*.swift into $modules/libNAME.a and NAME.swiftmodule.
# Inputs beyond the sources (the modules NAME imports) are passed after the name.
build_module() {
  local name=$1 sources folders
  shift
  mapfile -t sources < <(find "Sources/$name" -name '*.swift' | LC_ALL=C sort)
  mapfile -t folders < <(find "Sources/$name" -type d)
  if [[ ${#sources[@]} -eq 0 ]]; then
    echo "fuzz.sh: no Swift sources in Sources/$name" >&2
    exit 1
  fi
  local library=$modules/lib$name.a
  if stale "$library" "${sources[@]}" "${folders[@]}" "$@" "$0"; then
    echo "fuzz.sh: building $library" >&2
    rm -f "$library"
    swiftc "${swift_flags[@]}" -emit-library -static -emit-module -module-name "$name" \
      -emit-module-path "$modules/$name.swiftmodule" "${sources[@]}" -o "$library"
  fi
}

build_module Tensors
build_module TensorIO "$modules/libTensors.a"

if stale "$binary" "$entry" "$modules/libTensorIO.a" "$modules/libTensors.a" "$0"; then
  echo "fuzz.sh: building $binary" >&2
  # TensorIO before Tensors: a static library only resolves what comes before it.
  swiftc "${swift_flags[@]}" -use-ld=lld -module-name "Fuzz_$target" "$entry" \
    -L "$modules" -lTensorIO -lTensors -o "$binary"
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

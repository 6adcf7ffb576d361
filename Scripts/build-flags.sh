#!/usr/bin/env bash
# Prints the Swift compiler flags both builds use (setup's release build and the tests'), one per
# line, so the tests exercise the code the release runs.
#
# The kernels' element-wise passes (max, exp, dropout) are SIMD code: compiled for the CPU that
# runs them (AVX2/AVX-512) they are 2-3x faster than for the baseline x86-64 target, and on CPUs
# with FMA the exp polynomial uses fused multiply-adds (-DATTN_FMA, about 5% of a whole attention
# call); on CPUs with F16C a float16 KV cache is widened by its conversion instruction
# (-DATTN_F16C), and on CPUs with AVX-512F a decode step over a compact KV cache reduces sixteen
# dot products at once with AVX-512 permutes (-DATTN_AVX512, see LaneSums.swift). The flags are
# given on the command line, not in Package.swift, so a package that depends on AttentionKit
# builds without them, as correct and only slower. ATTN_TARGET_CPU= turns them off.
set -euo pipefail
target_cpu=${ATTN_TARGET_CPU-native}
[ -n "$target_cpu" ] || exit 0
printf '%s\n' -Xswiftc -target-cpu -Xswiftc "$target_cpu"
if [ "$target_cpu" = native ] && grep -qw fma /proc/cpuinfo 2>/dev/null; then
  printf '%s\n' -Xswiftc -DATTN_FMA
fi
if [ "$target_cpu" = native ] && grep -qw f16c /proc/cpuinfo 2>/dev/null; then
  printf '%s\n' -Xswiftc -DATTN_F16C
fi
if [ "$target_cpu" = native ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  printf '%s\n' -Xswiftc -DATTN_AVX512
fi

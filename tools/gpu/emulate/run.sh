#!/usr/bin/env bash
# Checks attention.cu's tiled training kernels without a GPU: cuda_on_cpu.h runs each thread
# of a block as an OS thread (barriers for __syncthreads and warp shuffles), and
# attention_test.cpp compares forward (out, lse) and backward (dq, dk, dv) with a
# double-precision reference over GQA groups of 1 to 16, MLA's 192/128 heads, 256-wide heads
# (8-row tiles), packed segments and sliding windows. Its launch shapes mirror
# crates/kiln-cuda/src/attention_tiling.rs. Needs g++ >= 12 (C++20 <barrier>); about 40 s.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="$here/../../../crates/kiln-cuda/src/kernels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat "$kernels/common.cuh" "$kernels/attention_lanes.cuh" "$kernels/attention.cu" |
  sed 's/extern __shared__ float shared\[\];/float* shared = emu_dynamic_shared;/' > "$work/kernels.inc"
g++ -std=c++20 -O2 -pthread -w -I"$here" -I"$work" "$here/attention_test.cpp" -o "$work/attention_test"
"$work/attention_test"

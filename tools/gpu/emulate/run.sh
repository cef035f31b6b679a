#!/usr/bin/env bash
# Checks the training attention kernels without a GPU: cuda_on_cpu.h runs each thread of a
# block as an OS thread (barriers for __syncthreads and warp shuffles; mma.sync computed from
# every lane's fragments in PTX's layout), and attention_test.cpp compares forward (out, lse)
# and backward (dq, dk, dv) with a double-precision reference: attention.cu's f32 kernels over
# GQA groups of 1 to 16, MLA's 192/128 heads, 256-wide heads (8-row tiles), packed segments, a
# prefix that later segments share (a prompt its completions see) and sliding windows (within
# 1e-5 of each output's largest magnitude), and attention_mma.cu's bf16
# tensor-core kernels on bf16-rounded inputs over several 64-row tiles (within 2e-2; a wrong
# fragment layout is off by ~1). Launch shapes mirror crates/kiln-cuda/src/attention_tiling.rs.
# merge_test.cpp checks attention_sinks.cu's merge of two attentions (DeepSeek-V4's window and
# compressed entries) the same way, and decode_test.cpp attention_decode.cu's decode over a
# prompt's cached rows then a sequence's own (f32 and bf16 caches, windows).
# Needs g++ >= 12 (C++20 <barrier>); about a minute.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="$here/../../../crates/kiln-cuda/src/kernels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat "$kernels/common.cuh" "$kernels/attention_lanes.cuh" "$kernels/attention.cu" "$kernels/mma.cuh" "$kernels/attention_mma.cu" |
  sed 's/extern __shared__ float shared\[\];/float* shared = emu_dynamic_shared;/' > "$work/kernels.inc"
g++ -std=c++20 -O2 -pthread -w -I"$here" -I"$work" "$here/attention_test.cpp" -o "$work/attention_test"
"$work/attention_test"
cat "$kernels/common.cuh" "$kernels/attention_sinks.cu" > "$work/merge_kernels.inc"
g++ -std=c++20 -O2 -pthread -w -I"$here" -I"$work" "$here/merge_test.cpp" -o "$work/merge_test"
"$work/merge_test"
cat "$kernels/common.cuh" "$kernels/attention_lanes.cuh" "$kernels/attention_decode.cu" > "$work/decode_kernels.inc"
g++ -std=c++20 -O2 -pthread -w -I"$here" -I"$work" "$here/decode_test.cpp" -o "$work/decode_test"
"$work/decode_test"

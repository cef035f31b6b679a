#!/usr/bin/env bash
# bf16 against f32 on the demo's SFT stage: held-out eval loss and exact match per seed,
# the two precisions interleaved, and their means. A single seed says little: the held-out
# questions are a family SFT never demonstrates, and how well a run generalises to them moves
# by several points from seed to seed in either precision.
#
#   bench/demo_precision.sh [SEEDS] [KILN]     e.g. bench/demo_precision.sh "0 1 2 3 4"
set -euo pipefail
seeds=${1:-"0 1 2 3 4"}
kiln=${2:-./target/release/kiln}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| seed | f32 eval loss | f32 exact match | bf16 eval loss | bf16 exact match |"
echo "| ---: | ---: | ---: | ---: | ---: |"
for seed in $seeds; do
  row="| $seed"
  for dtype in f32 bf16; do
    "$kiln" demo --sft-only --dtype "$dtype" --seed "$seed" --out "$out/$dtype-$seed" > "$out/$dtype-$seed.log"
    # "| after SFT (300 steps) | 0.095 | 61.5% | - |" -> " 0.095 | 61.5%"
    row+=" |$(grep '^| after SFT' "$out/$dtype-$seed.log" | cut -d'|' -f3,4)"
  done
  echo "$row |"
done | tee "$out/rows"
awk -F'|' '{ for (i = 3; i <= 6; i++) { gsub(/[ %]/, "", $i); s[i] += $i } n++ }
  END { printf "| mean | %.3f | %.1f%% | %.3f | %.1f%% |\n", s[3]/n, s[4]/n, s[5]/n, s[6]/n }' "$out/rows"

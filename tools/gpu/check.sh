#!/usr/bin/env bash
# The device check of the CUDA backend, on a machine with an Nvidia GPU, PyTorch and
# transformers, but no Rust toolchain and no network. Run tools/gpu/build.sh first on the
# development machine and carry target/gpu/bin; then, from the repository root:
#
#     OUT=/some/folder tools/gpu/check.sh
#
# Everything goes to $OUT: env.txt (driver, GPU, library versions), one log per step and
# summary.txt (each step's status and seconds, the benchmark's numbers). Steps: the kernels
# compile for this GPU; NCCL's collectives on this GPU (one rank; two where there are two
# GPUs); the conformance suite and the transformers goldens (f32 and bf16) on CUDA, with
# KILN_REQUIRE_CUDA=1 so a missing device fails instead of skipping; `kiln score` on CUDA
# against transformers' log-probs for every model type; the demo's SFT stage on the GPU; the bf16 matrix-product rate; then kiln and PyTorch (eager, SDPA, fused
# AdamW, bf16 autocast) training the 1B reference model, interleaved. About 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu-check}
mkdir -p "$OUT"
BIN=target/gpu/bin
PY=${PYTHON:-python3}
SITE=$($PY -c 'import site; print(site.getsitepackages()[0])')
# The CUDA libraries are the pip wheels' (nvidia/cu13/lib, nvidia/nccl/lib, ...).
export LD_LIBRARY_PATH="$(ls -d "$SITE"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export KILN_REQUIRE_CUDA=1 KILN_REQUIRE_NVRTC=1 KILN_REQUIRE_NCCL=1 KILN_FIXTURES="$PWD/tests/fixtures" RUST_BACKTRACE=1
status=0

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit into $OUT/NAME.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || { status=1; tail -n 20 "$OUT/$name.txt"; }
}

{
  date -u
  nvidia-smi
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
  ls "$SITE"/nvidia "$SITE"/nvidia/*/lib
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  lscpu | head -20
} > "$OUT/env.txt" 2>&1
: > "$OUT/summary.txt"

step kernels_compile 120 "$BIN/kernels_compile"
step nccl 60 "$BIN/nccl"
step conformance 240 "$BIN/conformance" --test-threads 4
step golden 240 "$BIN/golden_parity" --test-threads 4
KILN_BIN="$BIN/kiln" KILN_BACKEND=cuda step score 120 "$BIN/score_cli" --test-threads 2
step demo_sft 300 "$BIN/kiln" --backend cuda demo --sft-only --out "$OUT/demo"
step gemm 90 "$BIN/kiln" --backend cuda bench gemm --config bench/reference_1b.json --tokens 16384 --runs 5
TRAIN=(--config bench/reference_1b.json --batch 8 --seq 2048 --steps 3 --warmup 1)
for round in 1 2; do
  step "kiln_train_$round" 180 "$BIN/kiln" --backend cuda bench train "${TRAIN[@]}" --dtype bf16
  step "torch_train_$round" 180 $PY bench/torch_ref.py "${TRAIN[@]}" --device cuda --autocast bf16
done

# The benchmark's numbers: tokens/s of each, their ratio, MFU against the measured bf16 rate.
$PY - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import re, sys, pathlib
out = pathlib.Path(sys.argv[1])
def grab(name, pattern):
    path = out / f"{name}.txt"
    m = re.search(pattern, path.read_text()) if path.exists() else None
    return float(m.group(1)) if m else None
rate = grab("gemm", r"all of them\s+\S+\s+\S+\s+\S+\s+(\d+)")
for r in (1, 2):
    kiln = grab(f"kiln_train_{r}", r"(\d+) tokens/s")
    torch = grab(f"torch_train_{r}", r"(\d+) tokens/s")
    gflops = grab(f"kiln_train_{r}", r"([\d.]+) GFLOP/s of matrix products")
    kmem = grab(f"kiln_train_{r}", r"peak device memory\s+(\d+) MiB")
    tmem = grab(f"torch_train_{r}", r"peak device memory\s+(\d+) MiB")
    ratio = f"{kiln / torch:.2f}x" if kiln and torch else "n/a"
    mfu = f"{100 * gflops / rate:.0f}%" if gflops and rate else "n/a"
    print(f"round {r}: kiln {kiln} tokens/s, PyTorch {torch} tokens/s, kiln/PyTorch {ratio}; "
          f"kiln MFU {mfu} of the measured bf16 product rate ({rate} GFLOP/s); peak memory kiln {kmem} MiB, PyTorch {tmem} MiB")
PY
echo "status $status" | tee -a "$OUT/summary.txt"
exit $status

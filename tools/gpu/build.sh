#!/usr/bin/env bash
# Builds what check.sh runs on a GPU machine that has no Rust toolchain: the kiln binary and
# the CUDA test binaries, for x86-64-v3 (the repository builds for this CPU, whose instructions
# the GPU host's CPU may lack), without debug info and stripped, into target/gpu/bin. Carry
# that folder to the GPU machine (the device tool's `carry`: ["target/gpu/bin"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
export RUSTFLAGS="-C target-cpu=x86-64-v3" CARGO_TARGET_DIR=target/gpu CARGO_PROFILE_RELEASE_DEBUG=0
cargo build --release -p kiln
cargo test --release -p kiln-cuda -p kiln --no-run --message-format=json > target/gpu/tests.json
rm -rf target/gpu/bin && mkdir -p target/gpu/bin
cp target/gpu/release/kiln target/gpu/bin/
python3 - <<'PY'
import json, shutil
for line in open("target/gpu/tests.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        name = m["target"]["name"]
        if name in ("conformance", "golden_parity", "kernels_compile", "nccl", "score_cli"):
            shutil.copy(m["executable"], f"target/gpu/bin/{name}")
PY
strip target/gpu/bin/*
ls -la target/gpu/bin
du -sh target/gpu/bin

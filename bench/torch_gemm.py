"""PyTorch's matrix products for the shapes `kiln bench gemm` times: one training step's linear
layers (forward, input gradient, weight gradient), f32 and bf16, median of timed calls.

    python bench/torch_gemm.py --config bench/reference_config.json --threads 2
"""

import argparse
import json
import time

import torch


def median_time(runs, f):
    f()
    f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = json.load(open(args.config))
    d, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim", d // heads)
    t = args.tokens
    print(f"{'product (m x n x k)':<34} {'f32 ms':>9} {'GFLOP/s':>9} {'bf16 ms':>9} {'GFLOP/s':>9} {'ratio':>7}")
    total = {torch.float32: 0.0, torch.bfloat16: 0.0}
    flops = 0.0
    for name, d_in, d_out in [("attention", d, heads * hd), ("mlp up", d, ff), ("mlp down", ff, d), ("lm head", d, v)]:
        # y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x with PyTorch-layout weights, as kiln's linear layers.
        for what, m, n, k in [("forward", t, d_out, d_in), ("dx", t, d_in, d_out), ("dw", d_out, d_in, t)]:
            times = {}
            for dtype in [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]:
                g = torch.Generator().manual_seed(1)
                if what == "forward":
                    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).t()
                elif what == "dx":
                    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
                else:
                    a, b = torch.randn(k, m, generator=g).t(), torch.randn(k, n, generator=g)
                a, b = a.to(dtype), b.to(dtype)
                s = median_time(args.runs, lambda: torch.mm(a, b))
                times[dtype] = min(times.get(dtype, s), s)
            gflop = 2 * m * n * k / 1e9
            f, h = times[torch.float32], times[torch.bfloat16]
            total[torch.float32] += f
            total[torch.bfloat16] += h
            flops += gflop
            label = f"{name} {d_in}->{d_out} {what}"
            print(f"{label:<34} {f*1e3:>9.3f} {gflop/f:>9.0f} {h*1e3:>9.3f} {gflop/h:>9.0f} {f/h:>6.2f}x")
    f, h = total[torch.float32], total[torch.bfloat16]
    print(f"{'all of them':<34} {f*1e3:>9.3f} {flops/f:>9.0f} {h*1e3:>9.3f} {flops/h:>9.0f} {f/h:>6.2f}x")


if __name__ == "__main__":
    main()

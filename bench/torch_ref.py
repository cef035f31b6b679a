"""The PyTorch side of `kiln bench train`: the same training step in eager PyTorch.

Same model (transformers' LlamaForCausalLM from a config.json, randomly initialised, f32,
SDPA attention; eager for DeepSeek-V4), same batch shape, same optimiser (torch.optim.AdamW, lr 1e-4, weight decay
0.1), same thread count. Prints step time, tokens/s and peak resident memory.
`--autocast bf16` runs forward and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`
with f32 weights and optimizer (PyTorch's mixed precision, what a PyTorch user turns on).
`--device cuda` runs it on the GPU (fused AdamW, as a PyTorch user would there) and reports
peak GPU memory (`torch.cuda.max_memory_allocated`) beside the step time.

    python bench/torch_ref.py --config bench/reference_config.json --batch 4 --seq 256 --threads 2
    python bench/torch_ref.py --autocast bf16
    python bench/torch_ref.py --config bench/reference_1b.json --batch 8 --seq 2048 --device cuda --autocast bf16
"""

import contextlib

import argparse
import resource
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench/reference_config.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    cuda = args.device == "cuda"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    # DeepSeek-V4's attention sinks and compressed entries run only in transformers' eager path.
    attention = "eager" if config.model_type == "deepseek_v4" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)
    model.to(args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True if cuda else None)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)

    def autocast():
        if args.autocast == "bf16":
            return torch.autocast(args.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(dt)
    median = statistics.median(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(f"torch_ref: {params} params, batch {args.batch}x{args.seq}, {where}, autocast {args.autocast}, torch {torch.__version__}")
    print(f"  step      median {median * 1e3:.1f} ms, mean {statistics.mean(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms ({len(times)} steps)")
    print(f"  speed     {args.batch * args.seq / median:.0f} tokens/s (median)")
    print(f"  loss      {losses[0]:.4f} -> {losses[-1]:.4f}")
    if cuda:
        print(f"  peak device memory  {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"  peak RSS  {peak_mib:.0f} MiB (includes the Python interpreter and torch libraries)")


if __name__ == "__main__":
    main()

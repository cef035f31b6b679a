"""PyTorch's data parallel, the reference for `kiln bench train` under mpirun (bench/README.md).

A Hugging Face Llama directory (bench/random_llama.py writes one) trained on random token
rows, `--rows` × `--seq` per rank: f32, next-token cross-entropy, AdamW, one CPU thread per
rank. Under `torchrun` the ranks run DistributedDataParallel over gloo (its gradient buckets
all-reduced during backward, 25 MB each by default), with `--zero 1` AdamW's state sharded by
ZeroRedundancyOptimizer (ZeRO-1), or with `--zero 2` / `--zero 3` FSDP's `fully_shard`
(gradients sharded; with 3 the weights too, gathered per layer). Without `torchrun` it
trains the whole model in one process. Prints the median step, tokens per second over all
ranks, and the peak resident memory.

    torchrun --nproc-per-node 2 bench/torch_ddp.py /tmp/refllama --rows 4 --seq 256 --zero 0
    python3 bench/torch_ddp.py /tmp/refllama --rows 4 --seq 256
"""

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaForCausalLM


def wrapped(model, zero):
    """`model` under data parallel with ZeRO stage `zero`, and its optimizer."""
    if zero <= 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(model)
        if zero == 0:
            return module, torch.optim.AdamW(module.parameters(), lr=1e-4)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return module, ZeroRedundancyOptimizer(module.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    from torch.distributed.fsdp import fully_shard

    reshard = zero == 3
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    parallel = "WORLD_SIZE" in os.environ
    if parallel:
        dist.init_process_group("gloo")
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if parallel else (0, 1)
    torch.manual_seed(1 + rank)
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(0, model.config.vocab_size, (a.rows, a.seq + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    module, optimizer = wrapped(model, a.zero) if parallel else (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        logits = module(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    median = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        layout = f"{ranks} ranks, ZeRO-{a.zero}" if parallel else "one process"
        print(f"torch {layout}: median step {median * 1e3:.0f} ms, {ranks * a.rows * a.seq / median:.0f} tokens/s, "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, rank 0 peak RSS {peak_mb:.0f} MiB", flush=True)
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""PyTorch's pipeline parallel, the reference for `kiln sft --layout pp=2` (bench/README.md).

A Hugging Face Llama directory (bench/random_llama.py writes one) cut into stages of
consecutive layers, the first with the embedding, the last with the final norm and the head,
trained with `torch.distributed.pipelining` (1F1B, or GPipe) on random token rows: f32,
next-token cross-entropy, AdamW, one CPU thread per rank, gloo between the ranks. Without
`torchrun` it trains the whole model in one process on the same rows, for the one-process
reference. Prints each step's seconds and the peak resident memory.

    torchrun --nproc-per-node 2 bench/torch_pipeline.py /tmp/refllama --rows 128 --seq 128 --chunks 4
    python3 bench/torch_pipeline.py /tmp/refllama --rows 128 --seq 128
"""

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaForCausalLM


class Stage(nn.Module):
    """Layers `layers` of `model`, with the embedding on the first stage and the final norm
    and head on the last."""

    def __init__(self, model, layers, first, last):
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens if first else None
        self.layers = nn.ModuleList(inner.layers[i] for i in layers)
        self.rotary = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.head = model.lm_head if last else None

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rope = self.rotary(h, position_ids=positions)
        for layer in self.layers:
            # No mask: SDPA attends causally.
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
        if self.head is not None:
            h = self.head(self.norm(h))
        return h


def next_token_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    ids = torch.randint(0, vocab, (a.rows, a.seq + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pipelined = "WORLD_SIZE" in os.environ
    if pipelined:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        dist.init_process_group("gloo")
        rank, stages = dist.get_rank(), dist.get_world_size()
        mine = range(rank * layers // stages, (rank + 1) * layers // stages)
        module = Stage(model, mine, rank == 0, rank == stages - 1)
        stage = PipelineStage(module, rank, stages, torch.device("cpu"))
        kind = Schedule1F1B if a.schedule == "1f1b" else ScheduleGPipe
        schedule = kind(stage, n_microbatches=a.chunks, loss_fn=next_token_loss)
    else:
        rank, stages = 0, 1
        module = Stage(model, range(layers), True, True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    for step in range(1, a.steps + 1):
        if pipelined:
            dist.barrier()
        started = time.perf_counter()
        optimizer.zero_grad()
        losses = []
        if not pipelined:
            loss = next_token_loss(module(x), y)
            loss.backward()
            losses = [loss]
        elif rank == 0:
            schedule.step(x)
        elif rank == stages - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        if pipelined:
            dist.barrier()
        seconds = time.perf_counter() - started
        if losses:
            loss = sum(l.item() for l in losses) / len(losses)
            print(f"step {step}: {seconds:.2f} s, loss {loss:.4f}", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rank {rank} of {stages}: peak RSS {peak_mb:.0f} MB", flush=True)
    if pipelined:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The PyTorch side of `kiln bench generate`: transformers' `generate` on the same model and
shape (randomly initialised from a config.json, f32 or bf16 (`--dtype`), SDPA, KV cache, sampling at temperature
1, every sequence running to max_new_tokens), same thread count. Prints new tokens/s.

    python bench/torch_generate.py --config bench/reference_config.json --batch 64 --prompt 32 --new-tokens 64
"""

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench/reference_config.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights and compute dtype")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype], attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    times = []
    for run in range(args.runs + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.new_tokens
        if run > 0:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"torch generate: {args.batch} sequences, prompt {args.prompt}, {args.new_tokens} new tokens each, "
          f"{args.threads} threads")
    print(f"  median {median:.2f} s per batch, {args.batch * args.new_tokens / median:.0f} new tokens/s")


if __name__ == "__main__":
    main()

"""torch.optim.Muon's step on the hidden matrices of a Llama config (what `kiln bench train
--optimizer muon` reports as its update), for the side-by-side ratio: median seconds of
`--steps` steps after one warm-up step.
Run:  python bench/torch_muon.py --config bench/reference_config.json
"""

import argparse
import json
import time

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()
c = json.load(open(args.config))
h, ff, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
hd = c.get("head_dim", h // heads)
shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (ff, h), (ff, h), (h, ff)] * layers
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
for p in params:
    p.grad = torch.randn_like(p)
opt = torch.optim.Muon(params, lr=1e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
times = []
for step in range(args.steps + 1):
    t0 = time.perf_counter()
    opt.step()
    if step > 0:
        times.append(time.perf_counter() - t0)
times.sort()
values = sum(p.numel() for p in params)
print(f"torch.optim.Muon: {len(params)} matrices ({values} values), torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads: median {times[len(times) // 2] * 1e3:.1f} ms")

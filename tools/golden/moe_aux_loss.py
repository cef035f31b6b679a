"""Golden values for DeepSeek-V3's sequence-wise balance loss (V3 report, eqs. 17-20),
computed with torch autograd on fixed inputs.

For each sequence S of T tokens (a packed segment of a row), with sigmoid router scores
s_{i,t}, top-k choices and N experts:
  s'_{i,t} = s_{i,t} / sum_j s_{j,t}
  f_i      = N / (K T) * #{t in S : i in top-k(t)}
  P_i      = 1/T * sum_t s'_{i,t}
  L        = alpha * sum_S W_S * sum_i f_i P_i
W_S is the sum of the sequence's per-token loss weights (kiln's token-weighted mean over
sequences; 1/#sequences when every sequence has one weighted token).

Writes tests/fixtures/moe/aux_loss.safetensors: logits [T, N], indices [T, K] (i64),
sequence [T] (i64, -1 = padding), weights [T], alpha [], loss [], dlogits [T, N].
Run:  python tools/golden/moe_aux_loss.py
"""

import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "moe" / "aux_loss.safetensors"

gen = torch.Generator().manual_seed(7)
tokens, experts, top_k, alpha = 24, 8, 2, 0.3
logits = torch.randn(tokens, experts, generator=gen, dtype=torch.float64).requires_grad_()
sequence = torch.tensor([0] * 9 + [1] * 7 + [-1] * 2 + [2] * 6)
weights = torch.rand(tokens, generator=gen, dtype=torch.float64) * (sequence >= 0)
scores = torch.sigmoid(logits)
indices = torch.topk(scores.detach() + 0.1 * torch.randn(experts, generator=gen, dtype=torch.float64), top_k).indices

norm = scores / scores.sum(-1, keepdim=True)
loss = torch.zeros((), dtype=torch.float64)
for s in sequence.unique():
    if s < 0:
        continue
    mask = sequence == s
    t = int(mask.sum())
    counts = torch.zeros(experts, dtype=torch.float64).index_add_(
        0, indices[mask].reshape(-1), torch.ones(t * top_k, dtype=torch.float64))
    f = experts / (top_k * t) * counts
    p = norm[mask].mean(0)
    loss = loss + alpha * weights[mask].sum() * (f * p).sum()
loss.backward()

save_file({
    "logits": logits.detach().float().contiguous(),
    "indices": indices.contiguous(),
    "sequence": sequence.contiguous(),
    "weights": weights.float().contiguous(),
    "alpha": torch.tensor(alpha, dtype=torch.float32),
    "loss": loss.detach().float().reshape(()),
    "dlogits": logits.grad.float().contiguous(),
}, OUT)
print("wrote", OUT, "loss", loss.item())

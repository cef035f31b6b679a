"""Golden values for GRPO's advantages and policy loss variants, computed with torch autograd
from TRL's GRPOTrainer formulas (DeepSeekMath's clipped objective with the k3 KL estimator;
DAPO's clip-higher and token-level normalisation; Dr. GRPO; GSPO's sequence-level ratio).

Inputs: 6 completions (2 groups of 3) of different lengths, padded to 7 tokens with a mask:
policy, sampling-policy and reference log-probs per token, and rewards. For each scale_rewards
the advantages; for each (loss_type, importance level, beta) the loss and its gradient with
respect to the policy log-probs, on the 6 as one batch and (`micro.` keys) as TRL's
GRPOTrainer takes a step of two micro-batches of 4 and 2 completions (gradient accumulation
2, one process, a generation batch of one step): grpo, bnpo and dr_grpo normalise within each
micro-batch and divide by the accumulation steps, dapo divides by the generation batch's
completion tokens.
Writes tests/fixtures/grpo/losses.safetensors.
Run:  python tools/golden/grpo_losses.py
"""

import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "grpo" / "losses.safetensors"
OUT.parent.mkdir(parents=True, exist_ok=True)
EPS_LOW, EPS_HIGH, MAX_LEN, NUM_ITEMS = 0.2, 0.28, 7, 40

gen = torch.Generator().manual_seed(11)
lengths = torch.tensor([7, 3, 5, 6, 2, 4])
n, t = len(lengths), MAX_LEN
mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
logp = old + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)  # ratios inside and outside the clip
ref = old + 0.2 * torch.randn(n, t, generator=gen, dtype=torch.float64)
rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], dtype=torch.float64)
group = 3

tensors = {"lengths": lengths, "old": old, "logp": logp, "ref": ref, "rewards": rewards,
           "params": torch.tensor([EPS_LOW, EPS_HIGH, MAX_LEN, NUM_ITEMS], dtype=torch.float64)}

g = rewards.view(-1, group)
mean = g.mean(1).repeat_interleave(group)
std = g.std(1).repeat_interleave(group)
tensors["adv.group"] = (rewards - mean) / (std + 1e-4)
tensors["adv.batch"] = (rewards - mean) / (rewards.std() + 1e-4)
tensors["adv.none"] = rewards - mean
adv = tensors["adv.group"]

for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
    for level in ["token", "sequence"]:
        for beta in [0.0, 0.04]:
            lp = logp.clone().requires_grad_()
            log_ratio = lp - old
            if level == "sequence":
                log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            else:
                log_w = log_ratio
            coef_1 = torch.exp(log_w)
            coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
            per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
            if beta != 0.0:
                kl = torch.exp(ref - lp) - (ref - lp) - 1
                per_token = per_token + beta * kl

            def aggregate(rows, accumulation, num_items):
                """TRL's `_compute_loss` aggregation of one micro-batch (`rows`)."""
                pt, m = per_token[rows], mask[rows]
                if loss_type == "grpo":
                    return ((pt * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / accumulation
                if loss_type == "bnpo":
                    return (pt * m).sum() / m.sum().clamp(min=1.0) / accumulation
                if loss_type == "dr_grpo":
                    return (pt * m).sum() / (pt.size(0) * MAX_LEN) / accumulation
                return (pt * m).sum() / num_items

            loss = aggregate(slice(0, n), 1, NUM_ITEMS)
            micro = aggregate(slice(0, 4), 2, mask.sum()) + aggregate(slice(4, n), 2, mask.sum())
            key = f"{loss_type}.{level}.{beta}"
            for prefix, value in [("", loss), ("micro.", micro)]:
                (grad,) = torch.autograd.grad(value, lp, retain_graph=True)
                tensors[f"{prefix}{key}.loss"] = value.detach().reshape(())
                tensors[f"{prefix}{key}.dlogp"] = (grad * mask).detach()
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT)
print("wrote", OUT)

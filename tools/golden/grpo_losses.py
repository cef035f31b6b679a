"""Golden values for GRPO's advantages and policy loss variants, computed with torch autograd
from TRL's GRPOTrainer formulas (DeepSeekMath's clipped objective with the k3 KL estimator;
DAPO's clip-higher and token-level normalisation; Dr. GRPO; GSPO's sequence-level ratio).

Inputs: 6 completions (2 groups of 3) of different lengths, padded to 7 tokens with a mask:
policy, sampling-policy and reference log-probs per token, and rewards. For each scale_rewards
the advantages; for each (loss_type, importance level, beta) the loss and its gradient with
respect to the policy log-probs.
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
            if loss_type == "grpo":
                loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
            elif loss_type == "bnpo":
                loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
            elif loss_type == "dr_grpo":
                loss = (per_token * mask).sum() / (per_token.size(0) * MAX_LEN)
            else:
                loss = (per_token * mask).sum() / NUM_ITEMS
            loss.backward()
            key = f"{loss_type}.{level}.{beta}"
            tensors[f"{key}.loss"] = loss.detach().reshape(())
            tensors[f"{key}.dlogp"] = (lp.grad * mask).detach()
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT)
print("wrote", OUT)

"""Golden values for the preference losses of `kiln dpo`, computed with torch autograd from
the formulas of the papers as TRL implements them (DPOTrainer.dpo_loss for sigmoid, hinge and
ipo, with ipo on length-averaged log-probs; CPOTrainer for simpo; ORPOTrainer.odds_ratio_loss
for orpo, on length-averaged log-probs).

Also the Bradley-Terry loss of reward models (TRL's RewardTrainer) with a margin and the
reward-centering term, and its gradient in the two rewards.

Inputs: for 8 pairs, the policy's summed log-probs of chosen and rejected completions, their
lengths, and the reference model's sums. For each loss: the per-pair loss and its gradient
with respect to the two policy sums.
Writes tests/fixtures/preference/losses.safetensors.
Run:  python tools/golden/preference_losses.py
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "preference" / "losses.safetensors"
BETA, SMOOTH, GAMMA = 0.3, 0.1, 0.5

gen = torch.Generator().manual_seed(3)
n = 8
chosen_len = torch.randint(1, 20, (n,), generator=gen)
rejected_len = torch.randint(1, 20, (n,), generator=gen)
chosen = -(torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 + 0.05) * chosen_len
rejected = -(torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 + 0.05) * rejected_len
ref_chosen = chosen + torch.randn(n, generator=gen, dtype=torch.float64)
ref_rejected = rejected + torch.randn(n, generator=gen, dtype=torch.float64)


def loss_of(kind, c, r):
    lc, lr = chosen_len.double(), rejected_len.double()
    if kind == "sigmoid":
        h = BETA * ((c - r) - (ref_chosen - ref_rejected))
        return -F.logsigmoid(h) * (1 - SMOOTH) - F.logsigmoid(-h) * SMOOTH
    if kind == "hinge":
        h = BETA * ((c - r) - (ref_chosen - ref_rejected))
        return torch.relu(1 - h)
    if kind == "ipo":
        h = (c / lc - r / lr) - (ref_chosen / lc - ref_rejected / lr)
        return (h - 1 / (2 * BETA)) ** 2
    if kind == "simpo":
        h = BETA * (c / lc - r / lr - GAMMA / BETA)
        return -F.logsigmoid(h) * (1 - SMOOTH) - F.logsigmoid(-h) * SMOOTH
    if kind == "orpo":
        mc, mr = c / lc, r / lr
        log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
        return -BETA * F.logsigmoid(log_odds)
    raise ValueError(kind)


tensors = {
    "chosen": chosen, "rejected": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len,
    "ref_chosen": ref_chosen, "ref_rejected": ref_rejected,
    "params": torch.tensor([BETA, SMOOTH, GAMMA], dtype=torch.float64),
}
for kind in ["sigmoid", "hinge", "ipo", "simpo", "orpo"]:
    c = chosen.clone().requires_grad_()
    r = rejected.clone().requires_grad_()
    losses = loss_of(kind, c, r)
    losses.sum().backward()
    tensors[f"{kind}.loss"] = losses.detach()
    tensors[f"{kind}.d_chosen"] = c.grad
    tensors[f"{kind}.d_rejected"] = r.grad
# Bradley-Terry for reward models (TRL RewardTrainer): -logsigmoid(r_c - r_r - margin)
# + center_rewards_coefficient * (r_c + r_r)^2, per pair, gradients in both rewards.
MARGIN, CENTER = 0.25, 0.01
rc = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
rr = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
bt = -F.logsigmoid(rc - rr - MARGIN) + CENTER * (rc + rr) ** 2
bt.sum().backward()
tensors.update({
    "bt.params": torch.tensor([MARGIN, CENTER], dtype=torch.float64),
    "bt.reward_chosen": rc.detach(), "bt.reward_rejected": rr.detach(),
    "bt.loss": bt.detach(), "bt.d_chosen": rc.grad, "bt.d_rejected": rr.grad,
})
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT)
print("wrote", OUT)

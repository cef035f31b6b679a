"""Golden values for the KTO loss of `kiln kto`, computed with torch autograd as TRL's
KTOTrainer (trl/trainer/kto_trainer.py, `_compute_loss`) computes it for one batch:

    kl = clamp(mean(KL_logps - ref_KL_logps), min=0), detached   (mismatched prompt/completion pairs)
    desirable:   lambda_D * (1 - sigmoid(beta * ((logp - ref_logp) - kl)))
    undesirable: lambda_U * (1 - sigmoid(beta * (kl - (logp - ref_logp))))
    loss = mean over the batch's examples

and its `apo_zero_unpaired` variant (no kl: 1 - sigmoid(beta * r) for desirable completions,
sigmoid(beta * r) for undesirable ones). Inputs: two batches of unpaired completions (labels,
the policy's and the reference's summed log-probs of each completion and of the mismatched KL
completions); the second has a negative KL estimate, which the clamp sets to 0. Outputs per
case: the loss, its gradient in every policy log-prob, the KL point, and the rewards
beta * (logp - ref_logp).
Writes tests/fixtures/kto/losses.safetensors.
Run:  python tools/golden/kto_loss.py
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "kto" / "losses.safetensors"
BETA, DESIRABLE, UNDESIRABLE = 0.3, 1.0, 1.33

gen = torch.Generator().manual_seed(5)
tensors = {"params": torch.tensor([BETA, DESIRABLE, UNDESIRABLE], dtype=torch.float64)}
for case, (n, kl_shift) in enumerate([(7, 0.8), (6, -1.5)]):
    labels = torch.rand(n, generator=gen) < 0.5
    labels[0], labels[1] = True, False
    logps = -(torch.rand(n, generator=gen, dtype=torch.float64) * 30 + 1)
    ref_logps = logps + torch.randn(n, generator=gen, dtype=torch.float64) * 2
    kl_ref = -(torch.rand(n, generator=gen, dtype=torch.float64) * 30 + 5)
    kl_logps = kl_ref + kl_shift + torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    for loss_type in ["kto", "apo_zero_unpaired"]:
        policy = logps.clone().requires_grad_()
        kl = (kl_logps - kl_ref).mean().detach().clamp(min=0) if loss_type == "kto" else torch.zeros((), dtype=torch.float64)
        chosen_idx = torch.nonzero(labels).view(-1)
        rejected_idx = torch.nonzero(~labels).view(-1)
        chosen = policy.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
        rejected = policy.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
        if loss_type == "kto":
            chosen_losses = 1 - F.sigmoid(BETA * (chosen - kl))
            rejected_losses = 1 - F.sigmoid(BETA * (kl - rejected))
        else:
            chosen_losses = 1 - F.sigmoid(BETA * chosen)
            rejected_losses = F.sigmoid(BETA * rejected)
        losses = torch.cat((DESIRABLE * chosen_losses, UNDESIRABLE * rejected_losses), 0)
        loss = losses.nanmean()
        loss.backward()
        prefix = f"{case}.{loss_type}"
        tensors[f"{prefix}.loss"] = loss.detach().reshape(1)
        tensors[f"{prefix}.dlogps"] = policy.grad
        tensors[f"{prefix}.kl"] = kl.reshape(1)
        tensors[f"{prefix}.rewards"] = (BETA * (logps - ref_logps)).detach()
    tensors[f"{case}.labels"] = labels.to(torch.int64)
    tensors[f"{case}.logps"] = logps
    tensors[f"{case}.ref_logps"] = ref_logps
    tensors[f"{case}.kl_logps"] = kl_logps
    tensors[f"{case}.kl_ref_logps"] = kl_ref

OUT.parent.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
print(f"wrote {OUT}")

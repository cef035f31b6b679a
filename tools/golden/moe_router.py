"""Golden routing of transformers' DeepseekV3TopkRouter, for kiln's `moe_route` op.

The router computes logits = hidden · Wᵀ; with W = I the hidden states are the logits, so
the fixture holds logits directly. Writes tests/fixtures/moe/router.safetensors:
  logits [tokens, experts], bias [experts] (non-zero correction bias), grad_out [tokens, k],
  weights [tokens, k] and indices [tokens, k] (as transformers returns them, unsorted),
  dlogits [tokens, experts] = d(Σ weights · grad_out)/d logits, and the config as metadata.

Run:  python tools/golden/moe_router.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "moe"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    experts, tokens = 16, 24
    config = DeepseekV3Config(
        hidden_size=experts, n_routed_experts=experts, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        # A bias large enough to change which groups and experts win.
        router.e_score_correction_bias.copy_(0.3 * torch.randn(experts, generator=gen))
    logits = (2.0 * torch.randn(tokens, experts, generator=gen)).requires_grad_()
    _, weights, indices = router(logits)
    grad_out = torch.randn(tokens, 4, generator=gen)
    (weights * grad_out).sum().backward()
    meta = {k: str(v) for k, v in dict(experts=experts, top_k=4, groups=4, top_groups=2, normalize=True, scale=2.5).items()}
    save_file(
        {
            "logits": logits.detach(),
            "bias": router.e_score_correction_bias.detach().clone(),
            "grad_out": grad_out,
            "weights": weights.detach(),
            "indices": indices.to(torch.int64),
            "dlogits": logits.grad,
        },
        OUT / "router.safetensors",
        metadata=meta,
    )
    print("written", OUT / "router.safetensors")


if __name__ == "__main__":
    main()

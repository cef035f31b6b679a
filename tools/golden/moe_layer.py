"""Golden forward and backward of transformers' DeepseekV3MoE (router, routed experts,
shared expert) on a tiny random configuration with a non-zero correction bias, for kiln's
MoE layer. Writes tests/fixtures/moe/layer.safetensors.

Run:  python tools/golden/moe_layer.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "moe"


def main() -> None:
    config = DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu",
    )
    moe = DeepseekV3MoE(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        moe.gate.e_score_correction_bias.copy_(0.2 * torch.randn(8, generator=gen))
    x = torch.randn(12, 16, generator=gen).requires_grad_()
    out = moe(x)
    grad_out = torch.randn(out.shape, generator=gen)
    (out * grad_out).sum().backward()
    inter = config.moe_intermediate_size
    gate_up = moe.experts.gate_up_proj
    save_file(
        {
            "x": x.detach(), "grad_out": grad_out, "out": out.detach(), "dx": x.grad,
            "router": moe.gate.weight.detach(), "bias": moe.gate.e_score_correction_bias.detach().clone(),
            "gate": gate_up.detach()[:, :inter].contiguous(), "up": gate_up.detach()[:, inter:].contiguous(),
            "down": moe.experts.down_proj.detach(),
            "shared_gate": moe.shared_experts.gate_proj.weight.detach(),
            "shared_up": moe.shared_experts.up_proj.weight.detach(),
            "shared_down": moe.shared_experts.down_proj.weight.detach(),
            "grad.router": moe.gate.weight.grad,
            "grad.gate": gate_up.grad[:, :inter].contiguous(), "grad.up": gate_up.grad[:, inter:].contiguous(),
            "grad.down": moe.experts.down_proj.grad,
            "grad.shared_gate": moe.shared_experts.gate_proj.weight.grad,
            "grad.shared_up": moe.shared_experts.up_proj.weight.grad,
            "grad.shared_down": moe.shared_experts.down_proj.weight.grad,
        },
        OUT / "layer.safetensors",
    )
    print("written", OUT / "layer.safetensors")


if __name__ == "__main__":
    main()

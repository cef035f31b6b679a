"""Golden forward and backward of transformers' DeepseekV4SparseMoeBlock (√softplus router
without groups, clamped SwiGLU experts and shared expert), for kiln's MoE layer: a scored
layer with a non-zero correction bias, and a hash layer routed by a frozen token-to-expert
table. `swiglu_limit` is small enough that many gate and up values are clamped.
Writes tests/fixtures/moe/layer_v4_{scored,hash}.safetensors.

Run:  python tools/golden/moe_layer_v4.py   (needs torch, transformers >= 5.2)
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "moe"
TOKENS, HIDDEN, VOCAB = 12, 16, 40


def case(name: str, hash_layer: bool, seed: int) -> None:
    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=3,
        num_hidden_layers=1, mlp_layer_types=["hash_moe" if hash_layer else "moe"], routed_scaling_factor=1.5,
        swiglu_limit=2.0, scoring_func="sqrtsoftplus",
    )
    moe = DeepseekV4SparseMoeBlock(config, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        if hash_layer:
            moe.gate.tid2eid.copy_(torch.randint(0, 8, moe.gate.tid2eid.shape, generator=gen))
        else:
            moe.gate.e_score_correction_bias.copy_(0.2 * torch.randn(8, generator=gen))
    x = torch.randn(1, TOKENS, HIDDEN, generator=gen).requires_grad_()
    ids = torch.randint(0, VOCAB, (1, TOKENS), generator=gen)
    out = moe(x, input_ids=ids)
    grad_out = torch.randn(out.shape, generator=gen)
    (out * grad_out).sum().backward()
    inter = config.moe_intermediate_size
    gate_up = moe.experts.gate_up_proj
    tensors = {
        "x": x.detach()[0], "grad_out": grad_out[0], "out": out.detach()[0], "dx": x.grad[0],
        "router": moe.gate.weight.detach(),
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
    }
    if hash_layer:
        tensors["routes"] = moe.gate.tid2eid[ids[0]].to(torch.int32).contiguous()
    else:
        tensors["bias"] = moe.gate.e_score_correction_bias.detach().clone()
    save_file(tensors, OUT / f"layer_v4_{name}.safetensors")
    print("written", OUT / f"layer_v4_{name}.safetensors")


if __name__ == "__main__":
    case("scored", False, 3)
    case("hash", True, 4)

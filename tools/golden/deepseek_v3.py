"""Golden fixtures for DeepSeek-V3 (multi-head latent attention + DeepSeekMoE): tiny random
models built and run by transformers' DeepseekV3ForCausalLM.

Cases, each in tests/fixtures/<case>/ (same golden.safetensors format as llama_family.py;
expert gradients are written stacked, as kiln holds them: grad.model.layers.L.mlp.experts.
{gate,up,down}_proj.weight of shape [experts, rows, cols]):
  deepseek_v3        low-rank q, interleaved rope, yarn with mscale/mscale_all_dim in the
                     legacy config style of deepseek-ai's config.json (`rope_scaling` with
                     `type: yarn`, top-level `rope_theta`), 1 dense + 2 MoE layers, grouped
                     routing with a non-zero correction bias, plus a multi-token-prediction
                     layer's tensors (bf16) that transformers ignores and kiln must carry through.
  deepseek_v3_plain  plain q projection, half-split rope, `rope_parameters` style, attention
                     biases, unnormalised top-k weights, two shared experts.
  deepseek_v3_fp8    the first case's weights block-quantized to fp8 e4m3 with weight_scale_inv
                     (16x16 blocks); golden.safetensors holds torch's dequantized tensors.

Run:  python tools/golden/deepseek_v3.py   (needs torch, transformers, safetensors)
"""

import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"

COMMON = dict(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=6,
    v_head_dim=10,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

CASES = {
    "deepseek_v3": dict(
        q_lora_rank=20,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        legacy=True,
        mtp=True,
    ),
    "deepseek_v3_plain": dict(
        q_lora_rank=None,
        n_shared_experts=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        rope_interleave=False,
        attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
}


def to_legacy(config_path: pathlib.Path) -> None:
    """Rewrites config.json the way deepseek-ai ships it: `rope_scaling` with `type`."""
    cfg = json.loads(config_path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    config_path.write_text(json.dumps(cfg, indent=2))


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


def kiln_grads(model: torch.nn.Module) -> dict:
    """Parameter gradients under kiln's names: experts stacked per projection."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().float()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            i = g.shape[1] // 2
            out[f"grad.{prefix}gate_proj.weight"] = g[:, :i].contiguous()
            out[f"grad.{prefix}up_proj.weight"] = g[:, i:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            out[f"grad.{name}.weight"] = g.contiguous()
        else:
            out[f"grad.{name}"] = g.contiguous()
    return out


def check_routing_uses_bias(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """The correction bias and the group limit must change some token's experts, or the
    fixture would not test them."""
    hidden = {}
    router = model.model.layers[1].mlp.gate

    def keep_input(module, inputs, output):
        hidden.setdefault("x", inputs[0].detach())

    handle = router.register_forward_hook(keep_input)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = hidden["x"].reshape(-1, router.weight.shape[1])
    scores = torch.sigmoid(x @ router.weight.T)
    _, _, chosen = router(x)
    plain = torch.topk(scores, router.top_k, dim=-1).indices
    differs = (chosen.sort(-1).values != plain.sort(-1).values).any(-1)
    assert differs.any(), "bias and group limit never change the routing"


def build(name: str, spec: dict) -> None:
    spec = dict(spec)
    legacy, mtp = spec.pop("legacy", False), spec.pop("mtp", False)
    config = DeepseekV3Config(**{**COMMON, **spec})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = DeepseekV3ForCausalLM(config).float()
    randomise(model, gen)

    case_dir = OUT / name
    shutil.rmtree(case_dir, ignore_errors=True)
    model_dir = case_dir / "model"
    model.save_pretrained(model_dir)
    if legacy:
        to_legacy(model_dir / "config.json")
    if mtp:
        # A multi-token-prediction layer as deepseek-ai stores it (layer index = num layers).
        st = load_file(model_dir / "model.safetensors")
        layer = f"model.layers.{config.num_hidden_layers}"
        d = config.hidden_size
        extra = {
            f"{layer}.enorm.weight": torch.randn(d, generator=gen),
            f"{layer}.hnorm.weight": torch.randn(d, generator=gen),
            f"{layer}.eh_proj.weight": torch.randn(d, 2 * d, generator=gen),
            f"{layer}.shared_head.norm.weight": torch.randn(d, generator=gen),
            f"{layer}.self_attn.kv_a_layernorm.weight": torch.randn(config.kv_lora_rank, generator=gen),
        }
        st.update({k: v.to(torch.bfloat16) for k, v in extra.items()})
        save_file(st, model_dir / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["num_nextn_predict_layers"] = 1
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    reloaded = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    rows, seq = 2, 12
    lengths = torch.tensor([seq, 9])
    ids = torch.randint(0, COMMON["vocab_size"], (rows, seq), generator=gen)
    ids[1, lengths[1]:] = 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    check_routing_uses_bias(reloaded, ids)

    out = reloaded(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(ref[valid], out.logits[valid], atol=1e-6), f"{name}: reload changed the logits"
    out.loss.backward()

    logp = torch.log_softmax(out.logits.detach().double(), dim=-1)
    token_logprobs = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    token_logprobs = token_logprobs.masked_fill(mask[:, 1:] == 0, 0.0).float()
    tensors = {
        "input_ids": ids.contiguous(),
        "lengths": lengths.contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "logprobs": token_logprobs.contiguous(),
        "loss": out.loss.detach().float().reshape(()).contiguous(),
    }
    with torch.no_grad():
        greedy = reloaded.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, min_new_tokens=5,
                                   eos_token_id=None, pad_token_id=0)[0, 6:]
    tensors["greedy"] = greedy.contiguous()
    tensors.update(kiln_grads(reloaded))
    save_file(tensors, case_dir / "golden.safetensors")


def build_fp8(source: str, block: int = 16) -> None:
    """Block-quantizes every projection matrix of `source` to fp8 e4m3 as DeepSeek ships it."""
    src = OUT / source / "model"
    case_dir = OUT / f"{source}_fp8"
    shutil.rmtree(case_dir, ignore_errors=True)
    model_dir = case_dir / "model"
    model_dir.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=[block, block])
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    stored, golden = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        quantize = (w.dim() == 2 and name.endswith("proj.weight") and "layers.3." not in name)
        if not quantize:
            stored[name] = w
            continue
        rows, cols = w.shape
        br, bc = -(-rows // block), -(-cols // block)
        padded = torch.zeros(br * block, bc * block)
        padded[:rows, :cols] = w.float()
        blocks = padded.reshape(br, block, bc, block)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).reshape(br * block, bc * block)[:rows, :cols]
        q = q.to(torch.float8_e4m3fn)
        stored[name] = q
        stored[f"{name}_scale_inv"] = scale.float()
        expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        golden[f"dequant.{name}"] = (q.float() * expanded).contiguous()
    save_file(stored, model_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(golden, case_dir / "golden.safetensors")


if __name__ == "__main__":
    for case, spec in CASES.items():
        build(case, spec)
        print("wrote", OUT / case)
    build_fp8("deepseek_v3")
    print("wrote", OUT / "deepseek_v3_fp8")

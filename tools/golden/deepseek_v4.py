"""Golden fixtures for DeepSeek-V4: tiny random models built and run by transformers'
DeepseekV4ForCausalLM (eager), for kiln's forward and backward.

Cases, each in tests/fixtures/<case>/ (model/ as transformers saves it, with DeepSeek's tensor
names; golden.safetensors with input_ids, lengths, logits, logprobs, loss, every parameter's
gradient as grad.<kiln tensor name> (experts stacked [experts, rows, cols]), and greedy
[prompts, new] with greedy_prompt_lengths: generate's greedy continuation, with V4's caches, of
each row's first greedy_prompt_lengths[r] tokens, one prompt at a time):
  deepseek_v4_sliding      sliding-window layers, hc_mult 2, a hash layer then scored layers
                           (√softplus, correction bias), sinks, grouped low-rank output,
                           clamped SwiGLU (swiglu_limit small enough to clamp)
  deepseek_v4_sliding_hc4  hc_mult 4, two hash layers, tied embeddings, 4 output groups
  deepseek_v4              sliding, compressed sparse (rate 4, overlapping windows, the indexer
                           keeping 3 of up to 6 entries) and heavily compressed (rate 8) layers
  deepseek_v4_hc4          hc_mult 4: compressed sparse (rate 2, top 4 of up to 12), heavily
                           compressed (rate 4), sliding, compressed sparse; tied embeddings
Sequences are longer than several windows and than index_topk entries; the script checks that
no query's indexer scores tie at the top-k cut (a tie would make the choice arbitrary).

  deepseek_v4_quantized    deepseek_v4's weights quantized as DeepSeek ships V4: routed experts
                           fp4 E2M1 packed two per int8 byte with a UE8M0 `.scale` per 1x32
                           block (1x16 where a row is 16 wide), attention projections fp8 E4M3
                           with UE8M0 `weight_scale_inv` per 4x4 block; golden.safetensors holds
                           dequant.<name>, transformers' `Fp8Dequantize` of each, in f32.

Run:  python tools/golden/deepseek_v4.py   (needs torch, transformers >= 5.2)
"""

import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"

COMMON = dict(
    vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_attention_heads=4, head_dim=16, q_lora_rank=12,
    n_routed_experts=6, num_experts_per_tok=2, sliding_window=5, o_lora_rank=8, index_n_heads=2, index_head_dim=8,
    index_topk=3, partial_rotary_factor=0.5, routed_scaling_factor=1.5, swiglu_limit=1.5, rms_norm_eps=1e-6,
    max_position_embeddings=64,
)

GREEDY_NEW = 14

CASES = {
    "deepseek_v4_sliding": dict(
        num_hidden_layers=3, layer_types=["sliding_attention"] * 3, mlp_layer_types=["hash_moe", "moe", "moe"],
        hc_mult=2, o_groups=2),
    "deepseek_v4_sliding_hc4": dict(
        num_hidden_layers=3, layer_types=["sliding_attention"] * 3, mlp_layer_types=["hash_moe", "hash_moe", "moe"],
        hc_mult=4, o_groups=4, tie_word_embeddings=True),
    "deepseek_v4": dict(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        hc_mult=2, o_groups=2, index_n_heads=4, index_topk=3, seq=24),
    "deepseek_v4_hc4": dict(
        num_hidden_layers=4,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        hc_mult=4, o_groups=4, index_n_heads=4, index_topk=4, tie_word_embeddings=True, seq=24),
}


def check_no_ties(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Every query's indexer scores must differ at the top-k cut, or the choice is arbitrary."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(out.detach()))
             for name, m in model.named_modules() if name.endswith("indexer.scorer")]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    k = model.config.index_topk
    rate = model.config.compress_rates["compressed_sparse_attention"]
    for scores in captured:
        for r in range(scores.shape[0]):
            for t in range(int(mask[r].sum())):
                visible = scores[r, t, : (t + 1) // rate]
                if visible.numel() > k:
                    top = visible.sort(descending=True).values
                    assert top[k - 1] != top[k], f"indexer tie at row {r}, token {t}: {top}"


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 or "position_bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
            if name.endswith("tid2eid"):
                buf.copy_(torch.randint(0, model.config.n_routed_experts, buf.shape, generator=gen))


def saved_names(model: torch.nn.Module, saved: dict) -> dict:
    """transformers' parameter name → the name it is saved under (found by value: every
    parameter is random, so each matches one stored tensor)."""
    names = {}
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        hits = [k for k, v in saved.items() if v.shape == p.shape and torch.equal(v, p.detach())]
        assert len(hits) == 1, f"{name}: {hits}"
        names[name] = hits[0]
    return names


def kiln_grads(model: torch.nn.Module, names: dict) -> dict:
    """Parameter gradients under kiln's names: DeepSeek's, experts stacked per projection."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(p)
        if name.endswith("mlp.experts.gate_up_proj"):
            layer = name.split(".")[2]
            i = g.shape[1] // 2
            out[f"grad.model.layers.{layer}.ffn.experts.w1.weight"] = g[:, :i].contiguous()
            out[f"grad.model.layers.{layer}.ffn.experts.w3.weight"] = g[:, i:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            layer = name.split(".")[2]
            out[f"grad.model.layers.{layer}.ffn.experts.w2.weight"] = g.contiguous()
        else:
            out[f"grad.{names[name]}"] = g.contiguous()
    return out


def build(name: str, spec: dict) -> None:
    spec = dict(spec)
    seq = spec.pop("seq", 12)
    config = DeepseekV4Config(**{**COMMON, **spec})
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = DeepseekV4ForCausalLM(config).float()
    randomise(model, gen)

    case_dir = OUT / name
    shutil.rmtree(case_dir, ignore_errors=True)
    model_dir = case_dir / "model"
    model.save_pretrained(model_dir)
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    reloaded = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = saved_names(reloaded, load_file(model_dir / "model.safetensors"))

    rows = 2
    lengths = torch.tensor([seq, seq - 5])
    ids = torch.randint(0, config.vocab_size, (rows, seq), generator=gen)
    ids[1, lengths[1]:] = 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    check_no_ties(reloaded, ids, mask)
    out = reloaded(input_ids=ids, attention_mask=mask, labels=labels)
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
    # Greedy continuations long enough to slide the window several times and to complete
    # compressed windows while decoding.
    prompt_lengths = torch.tensor([10, 7])
    with torch.no_grad():
        greedy = [
            # The mask is given: generate would otherwise mask every prompt token equal to the
            # pad id.
            reloaded.generate(ids[r:r + 1, :n], attention_mask=torch.ones_like(ids[r:r + 1, :n]),
                              max_new_tokens=GREEDY_NEW, do_sample=False, min_new_tokens=GREEDY_NEW,
                              eos_token_id=None, pad_token_id=0)[0, n:]
            for r, n in enumerate(prompt_lengths.tolist())
        ]
    tensors["greedy"] = torch.stack(greedy).contiguous()
    tensors["greedy_prompt_lengths"] = prompt_lengths.contiguous()
    tensors.update(kiln_grads(reloaded, names))
    save_file(tensors, case_dir / "golden.safetensors")
    print(f"{name}: loss {out.loss.item():.6f}")


def ue8m0(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The power-of-two scale (UE8M0) that brings `amax` within the format's largest value."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / top))).clamp(2.0**-127, 2.0**127)


def quantize_fp4(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 values two per byte (low nibble first) as int8, and a UE8M0 scale per 1 x block."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, cols // block, block)
    scale = ue8m0(blocks.abs().amax(dim=-1), 6.0)
    grid = torch.tensor(Fp8Dequantize._FP4_E2M1_LUT)
    nearest = ((blocks / scale[..., None])[..., None] - grid).abs().argmin(dim=-1).reshape(rows, cols)
    packed = (nearest[:, 0::2] | (nearest[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and a UE8M0 scale per block x block."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows // block, block, cols // block, block)
    scale = ue8m0(blocks.abs().amax(dim=(1, 3)), 448.0)
    q = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def build_quantized(source: str) -> None:
    src = OUT / source / "model"
    case_dir = OUT / f"{source}_quantized"
    shutil.rmtree(case_dir, ignore_errors=True)
    model_dir = case_dir / "model"
    model_dir.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=[4, 4], scale_fmt="ue8m0", expert_dtype="fp4")
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    dequantize = Fp8Dequantize(None)
    stored, golden = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        if ".ffn.experts." in name and name.endswith(".weight"):
            q, scale = quantize_fp4(w, min(32, w.shape[1]))
            stored[name], stored[name.removesuffix(".weight") + ".scale"] = q, scale
        elif ".attn.w" in name and name.endswith(".weight") and w.dim() == 2:
            q, scale = quantize_fp8(w, 4)
            stored[name], stored[f"{name}_scale_inv"] = q, scale
        else:
            stored[name] = w
            continue
        golden[f"dequant.{name}"] = dequantize._dequantize_one(q, scale, output_dtype=torch.float32).contiguous()
    save_file(stored, model_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(golden, case_dir / "golden.safetensors")
    print(f"{source}_quantized: {len(golden)} quantized tensors")


if __name__ == "__main__":
    for case, spec in CASES.items():
        build(case, spec)
    build_quantized("deepseek_v4")

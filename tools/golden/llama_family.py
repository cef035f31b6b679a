"""Golden fixtures for the Llama family: tiny random models built and run by transformers.

For each case this writes tests/fixtures/<case>/:
  model/            a Hugging Face directory (save_pretrained; some rewritten to the legacy
                    `rope_theta` + `rope_scaling` config style, one sharded, one in bf16)
  golden.safetensors
      input_ids   [rows, seq] (i64), lengths [rows] (i64)
      logits      [rows, seq, vocab] f32 (rows are right-padded; compare real positions)
      logprobs    [rows, seq-1]  log p(ids[t+1] | ids[..=t]), 0 past a row's end
      loss        []  mean next-token cross-entropy over real targets
      greedy      [5] greedy continuation (generate, do_sample=False) of input_ids[0, :6]
      grad.<name> gradient of loss for every parameter

Run:  python tools/golden/llama_family.py   (needs torch, transformers, safetensors)
"""

import copy
import json
import pathlib
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"

COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

CASES = {
    # llama: biases everywhere, llama3 rope scaling, legacy config style, sharded weights.
    "llama": dict(
        model_type="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
        legacy=True,
        shard=True,
    ),
    # mistral: sliding window shorter than the sequence, default rope.
    "mistral": dict(model_type="mistral", sliding_window=5, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # qwen2: q/k/v bias, tied embeddings, linear rope scaling in the legacy `type` key, bf16 weights.
    "qwen2": dict(
        model_type="qwen2",
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
        legacy=True,
        bf16=True,
    ),
    # qwen3: explicit head_dim, q/k norm, yarn rope, MHA (no GQA).
    "qwen3": dict(
        model_type="qwen3",
        head_dim=16,
        num_key_value_heads=4,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    ),
}


def to_legacy(config_path: pathlib.Path) -> None:
    """Rewrites a saved config.json into the pre-`rope_parameters` style."""
    cfg = json.loads(config_path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    if rope_type != "default":
        params["type"] = rope_type  # the oldest spelling
        cfg["rope_scaling"] = params
    config_path.write_text(json.dumps(cfg, indent=2))


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def build(name: str, spec: dict) -> None:
    spec = dict(spec)
    legacy, shard, bf16 = spec.pop("legacy", False), spec.pop("shard", False), spec.pop("bf16", False)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**COMMON, **spec})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, gen)
    if bf16:  # golden values use the bf16-rounded weights, computed in f32
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))

    case_dir = OUT / name
    shutil.rmtree(case_dir, ignore_errors=True)
    model_dir = case_dir / "model"
    save_model = copy.deepcopy(model).to(torch.bfloat16) if bf16 else model
    save_model.save_pretrained(model_dir, max_shard_size="100KB" if shard else "1GB")
    if legacy:
        to_legacy(model_dir / "config.json")

    # Reload exactly as a user would, and check the reload reproduces the model.
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    rows, seq = 2, 12
    lengths = torch.tensor([seq, 9])
    ids = torch.randint(0, COMMON["vocab_size"], (rows, seq), generator=gen)
    ids[1, lengths[1]:] = 0
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)

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
    for pname, p in reloaded.named_parameters():
        tensors[f"grad.{pname}"] = p.grad.detach().float().contiguous()
    save_file(tensors, case_dir / "golden.safetensors")
    print(f"{name}: loss {out.loss.item():.6f}, {sum(p.numel() for p in reloaded.parameters())} parameters")


if __name__ == "__main__":
    for case, spec in CASES.items():
        build(case, spec)

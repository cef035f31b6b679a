"""A tiny DeepSeek-V4 checkpoint as transformers saves it, for kiln's load/save round trip:
every attention type (sliding, compressed sparse with its indexer, heavily compressed), hash and
scored MoE layers, hc_mult 2, a multi-token-prediction layer's tensors carried along. Saved in
bf16, so the tensors transformers keeps in f32 (hyper-connections, sinks, position biases,
norms, correction biases) show which dtype each tensor must come back in; the frozen
token-to-expert tables (tid2eid) are int64. Parameters that transformers initialises to
constants (sinks, biases, scales, position biases) get random values, so a kiln that reads the
wrong tensor or drops one cannot pass.

tests/fixtures/deepseek_v4_checkpoint/{config.json,model.safetensors}

Run:  python tools/golden/deepseek_v4_checkpoint.py   (needs torch, transformers >= 5.2)
"""

import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "deepseek_v4_checkpoint"

config = DeepseekV4Config(
    vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    head_dim=16, q_lora_rank=8, n_routed_experts=4, num_experts_per_tok=2,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=2, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=3, sliding_window=8,
    num_nextn_predict_layers=1, partial_rotary_factor=0.25)

torch.manual_seed(0)
model = DeepseekV4ForCausalLM(config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 1 or "position_bias" in name:
            p.copy_(torch.randn_like(p) * 0.5)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.1)
        if name.endswith("tid2eid"):
            buf.copy_(torch.randint(0, config.n_routed_experts, buf.shape))
OUT.mkdir(parents=True, exist_ok=True)
model.save_pretrained(OUT)
# Loaded back in bf16, transformers keeps its f32 modules in f32: that is the dtype map saved.
DeepseekV4ForCausalLM.from_pretrained(OUT, dtype=torch.bfloat16).save_pretrained(OUT)

# A multi-token-prediction layer's tensors (transformers ignores them; kiln carries them).
path = OUT / "model.safetensors"
tensors = load_file(path)
tensors["mtp.0.attn.wq_a.weight"] = torch.randn(8, 32).to(torch.bfloat16)
tensors["mtp.0.enorm.weight"] = torch.ones(32)
save_file(tensors, path, metadata={"format": "pt"})
print(f"{len(tensors)} tensors → {path}")

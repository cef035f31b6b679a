"""Parameter counts of tiny DeepSeek-V4 models as transformers builds them, for `kiln plan`'s
parity test: every attention type (sliding, compressed sparse with its indexer, heavily
compressed), hash-routed and scored MoE layers, hc_mult 2 and 4, tied and untied heads. One shared expert, as every
released V4 has (transformers builds one of `moe_intermediate_size` whatever
`n_shared_experts` says).

tests/fixtures/deepseek_v4_plan/<case>/config.json   transformers' config (its field names)
tests/fixtures/deepseek_v4_plan/<case>/params.json   {"total": n, "by_tensor": {name: numel}}
                                                     (nn.Parameters: the routers' correction
                                                     bias and tid2eid are buffers)
Run:  python tools/golden/deepseek_v4_plan.py   (needs torch, transformers >= 5.2)
"""

import json
import pathlib

import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "deepseek_v4_plan"

CASES = {
    "hc2": dict(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        head_dim=16, q_lora_rank=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        hc_mult=2, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8,
        num_nextn_predict_layers=1, qk_rope_head_dim=4, partial_rotary_factor=0.25),
    "hc4_tied": dict(
        vocab_size=96, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=5, num_attention_heads=6,
        head_dim=32, q_lora_rank=16, n_routed_experts=6, num_experts_per_tok=3, n_shared_experts=1,
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
                     "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 16},
        hc_mult=4, o_groups=3, o_lora_rank=12, index_n_heads=3, index_head_dim=16, index_topk=6, sliding_window=16,
        num_nextn_predict_layers=0, qk_rope_head_dim=8, partial_rotary_factor=0.25, tie_word_embeddings=True),
}

for name, kwargs in CASES.items():
    config = DeepseekV4Config(**kwargs)
    model = DeepseekV4ForCausalLM(config)
    by_tensor = {n: p.numel() for n, p in model.named_parameters()}
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    (out / "params.json").write_text(json.dumps({"total": sum(by_tensor.values()), "by_tensor": by_tensor}, indent=1) + "\n")
    print(f"{name}: {sum(by_tensor.values())} parameters (transformers {transformers.__version__})")

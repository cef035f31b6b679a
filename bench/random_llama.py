"""Writes a Hugging Face Llama directory with random weights (normal, std 0.02; norms 1) of a
given config and the demo's tokenizer, for whole-run measurements (`kiln sft` under mpirun)
on a model larger than the demo's. Pure Python, no NumPy or PyTorch: the values repeat a
block of 2^20 random numbers, which is enough for memory and speed measurements.

    python3 bench/random_llama.py bench/reference_config.json /tmp/reference-llama
"""

import array
import json
import random
import shutil
import struct
import sys
from pathlib import Path


def tensors(cfg):
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = d // heads
    shapes = {"model.embed_tokens.weight": [vocab, d], "model.norm.weight": [d]}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [vocab, d]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = [d]
        shapes[p + "post_attention_layernorm.weight"] = [d]
        shapes[p + "self_attn.q_proj.weight"] = [heads * head_dim, d]
        shapes[p + "self_attn.k_proj.weight"] = [kv_heads * head_dim, d]
        shapes[p + "self_attn.v_proj.weight"] = [kv_heads * head_dim, d]
        shapes[p + "self_attn.o_proj.weight"] = [d, heads * head_dim]
        shapes[p + "mlp.gate_proj.weight"] = [ff, d]
        shapes[p + "mlp.up_proj.weight"] = [ff, d]
        shapes[p + "mlp.down_proj.weight"] = [d, ff]
    return shapes


def main(config_path, out):
    cfg = json.loads(Path(config_path).read_text())
    cfg.update({"eos_token_id": 2, "pad_token_id": 0, "bos_token_id": None})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(__file__).resolve().parent.parent / "demo" / "base"
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(demo / name, out / name)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    random.seed(0)
    block = array.array("f", [random.gauss(0.0, 0.02) for _ in range(1 << 20)])
    header, blobs, offset = {}, [], 0
    for name, shape in tensors(cfg).items():
        count = 1
        for dim in shape:
            count *= dim
        if name.endswith("norm.weight"):
            values = array.array("f", [1.0] * count)
        else:
            values = (block * (count // len(block) + 1))[:count]
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    print(f"{out}: {offset / 1e6:.1f} MB of f32 weights")


if __name__ == "__main__":
    main(*sys.argv[1:])

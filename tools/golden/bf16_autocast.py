"""Golden fixtures for bf16 mixed precision: transformers under torch.autocast(bf16).

For each model case already written by llama_family.py and deepseek_v3.py, this loads the
committed model directory in f32 (eager attention) and the case's golden input_ids, runs the
forward pass under `torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's mixed precision:
matrix-product inputs rounded to bf16, f32 master weights), with DeepSeek-V3's router kept in
f32 as its code asks (it casts its inputs and weight to f32, which autocast would otherwise
override) and as kiln and Megatron compute it, and writes
tests/fixtures/<case>/autocast_bf16.safetensors:
  logprobs  [rows, seq-1]  log p(ids[t+1] | ids[..=t]) from the autocast logits, 0 past a row's end
  loss      []             mean next-token cross-entropy over real targets

The f32 values of the same inputs are golden.safetensors' `logprobs` and `loss`; their
difference from these is the bf16 rounding noise of transformers' own mixed precision, the
scale against which kiln's bf16 results are held (kiln_model::golden).

Run:  python tools/golden/bf16_autocast.py   (needs torch, transformers, safetensors; run after
      the two scripts above)
"""

import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"
CASES = ["llama", "mistral", "qwen2", "qwen3", "deepseek_v3", "deepseek_v3_plain"]


def f32_router(forward):
    def run(self, hidden_states):
        with torch.autocast("cpu", enabled=False):
            return forward(self, hidden_states.float())

    return run


DeepseekV3TopkRouter.forward = f32_router(DeepseekV3TopkRouter.forward)


def build(case: str) -> None:
    case_dir = OUT / case
    golden = load_file(case_dir / "golden.safetensors")
    ids, lengths = golden["input_ids"], golden["lengths"]
    seq = ids.shape[1]
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    model = AutoModelForCausalLM.from_pretrained(case_dir / "model", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    token_logprobs = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    token_logprobs = token_logprobs.masked_fill(mask[:, 1:] == 0, 0.0).float()
    save_file(
        {"logprobs": token_logprobs.contiguous(), "loss": out.loss.float().reshape(()).contiguous()},
        case_dir / "autocast_bf16.safetensors",
    )
    noise = (token_logprobs - golden["logprobs"]).abs().max().item()
    print(f"{case}: loss {out.loss.item():.6f} (f32 {golden['loss'].item():.6f}), max |logprob - f32| {noise:.3e}")


if __name__ == "__main__":
    for case in CASES:
        build(case)

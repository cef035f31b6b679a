"""Checks that a kiln-exported model directory loads in transformers and scores like kiln.

    kiln score --model EXPORT_DIR --tokens TOKENS.jsonl --output kiln_scores.jsonl
    python tools/check_export.py EXPORT_DIR TOKENS.jsonl kiln_scores.jsonl

Loads EXPORT_DIR with AutoModelForCausalLM and AutoTokenizer (from_pretrained, f32), computes
log p(ids[t+1] | ids[..=t]) for every line of TOKENS.jsonl and compares them with kiln's.
Exits non-zero if any differs by more than 1e-4.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, tokens_path, kiln_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["ids"] for line in open(tokens_path)]
    ours = [json.loads(line)["logprobs"] for line in open(kiln_path)]
    worst = 0.0
    for ids, theirs in zip(rows, ours):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        worst = max(worst, (logp - torch.tensor(theirs, dtype=torch.float64)).abs().max().item())
    print(f"{len(rows)} sequences; tokenizer has {len(tokenizer)} tokens; max |kiln - transformers| = {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()

"""Checks that a `kiln rm` model, exported with `kiln export`, loads in transformers as a
sequence classification model with one label and gives the rewards kiln gives.

    kiln score --reward --model EXPORT_DIR --tokens TOKENS.jsonl --output kiln_rewards.jsonl
    python tools/check_reward_export.py EXPORT_DIR TOKENS.jsonl kiln_rewards.jsonl

Loads EXPORT_DIR with AutoModelForSequenceClassification (f32), scores every line of
TOKENS.jsonl on its own (the reward is read at the last token) and compares with kiln's.
Exits non-zero if any differs by more than 1e-4.
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification


def main() -> None:
    model_dir, tokens_path, kiln_path = sys.argv[1:4]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.num_labels == 1, model.config.num_labels
    rows = [json.loads(line)["ids"] for line in open(tokens_path)]
    ours = [json.loads(line)["reward"] for line in open(kiln_path)]
    worst = 0.0
    for ids, theirs in zip(rows, ours):
        with torch.no_grad():
            reward = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        worst = max(worst, abs(reward - theirs))
    print(f"{type(model).__name__}: {len(rows)} sequences; max |kiln - transformers| reward = {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()

"""Golden loss masks from TRL's own SFT data preparation, for the chat templates of
Qwen2.5, Qwen3, Llama 3 (shipped without {% generation %} markers: TRL swaps in its training
templates), DeepSeek-V3 (likewise) and a Mistral-style template (none: TRL masks its
prompt-completion rows by where prompt and prompt+completion diverge).

The tokenizer is the demo's character-level one (tests/fixtures/chat/) with each family's
special tokens added, so masks are checked character by character and special tokens stay
whole. SFTTrainer prepares every row (assistant_only_loss=True for conversations; its default
completion-only loss for prompt-completion rows); its `input_ids` and which `labels` carry
loss are recorded.
Writes tests/fixtures/chat_masks/{tokenizer.json, tokenizer_config.json, golden.json}.

Run:  python tools/golden/assistant_masks.py
"""

import json
import pathlib

import trl
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "chat_masks"
TRL_TEMPLATES = pathlib.Path(trl.__file__).parent / "chat_templates"

SPECIAL = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<s>", "</s>", "[INST]", "[/INST]",
]
ADDED = ["<think>", "</think>"]  # Qwen3's: added tokens, not special ones

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# family: (template, bos, eos)
FAMILIES = {
    "qwen2.5": ((TRL_TEMPLATES / "qwen2_5.jinja").read_text(), None, "<|im_end|>"),
    "qwen3": ((TRL_TEMPLATES / "qwen3.jinja").read_text(), None, "<|im_end|>"),
    "llama3": ((TRL_TEMPLATES / "llama3.jinja").read_text(), "<|begin_of_text|>", "<|eot_id|>"),
    "deepseek-v3": ((TRL_TEMPLATES / "deepseekv3.jinja").read_text(), "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "Compute 12-7."},
        {"role": "assistant", "content": " 5 "},
        {"role": "user", "content": "And 40+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n42"},
    ],
]

PROMPT_COMPLETIONS = [
    {
        "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    },
]


def tokenizer(bos, eos, template):
    inner = Tokenizer.from_file(str(ROOT / "tests" / "fixtures" / "chat" / "tokenizer.json"))
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    inner.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=eos, bos_token=bos, pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def prepared(tok, rows, assistant_only_loss):
    """The rows as SFTTrainer prepares them (tokenized, masks attached)."""
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    args = SFTConfig(output_dir="/tmp/kiln-trl-masks", assistant_only_loss=assistant_only_loss, max_length=None,
                     report_to=[], bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=Qwen2ForCausalLM(config), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    return trainer.train_dataset


def trained(row):
    """Which tokens carry loss: TRL folds its masks into `labels` (-100 where not trained)."""
    return [int(label != -100) for label in row["labels"]]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer(None, "<|im_end|>", None).backend_tokenizer.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=1) + "\n")
    cases = []
    for family, (template, bos, eos) in FAMILIES.items():
        tok = tokenizer(bos, eos, template)
        conversations = [c for c in CONVERSATIONS if family != "mistral" or c[0]["role"] != "system"]
        if family != "mistral":  # TRL refuses assistant-only loss for templates it has no training variant of
            for conv, row in zip(conversations, prepared(tok, [{"messages": c} for c in conversations], True)):
                cases.append({"family": family, "template": template, "bos_token": bos, "eos_token": eos,
                              "messages": conv, "ids": row["input_ids"], "mask": trained(row)})
        for pc, row in zip(PROMPT_COMPLETIONS, prepared(tok, PROMPT_COMPLETIONS, False)):
            cases.append({"family": family, "template": template, "bos_token": bos, "eos_token": eos,
                          "prompt": pc["prompt"], "completion": pc["completion"],
                          "ids": row["input_ids"], "mask": trained(row)})
    (OUT / "golden.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases written to {OUT / 'golden.json'}")


if __name__ == "__main__":
    main()

"""Golden chat-template renderings and assistant masks from transformers.

Uses the demo's character-level tokenizer (tests/fixtures/chat/, written by
`kiln demo make-base`) with its ChatML template (which marks assistant text with
{% generation %}) and a few other templates, and records for each conversation what
`apply_chat_template` renders and, where the template has generation markers, which tokens
`return_assistant_tokens_mask` marks. Writes tests/fixtures/chat/golden.json.

Run:  python tools/golden/chat_template.py
"""

import json
import pathlib

from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIR = ROOT / "tests" / "fixtures" / "chat"

# Templates in the styles of published models (trim_blocks/lstrip_blocks matter for these).
TEMPLATES = {
    "demo_chatml_generation": None,  # the tokenizer's own
    "zephyr_style": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"
    ),
    "mistral_style": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "Compute 12-7."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "  And 40+2?  "},
        {"role": "assistant", "content": "42"},
    ],
]


def main() -> None:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DIR / "tokenizer.json"))
    config = json.loads((DIR / "tokenizer_config.json").read_text())
    tok.eos_token = config["eos_token"]
    tok.bos_token = "<|endoftext|>"
    cases = []
    for name, template in TEMPLATES.items():
        template = template or config["chat_template"]
        for conv in CONVERSATIONS:
            if name == "mistral_style" and conv[0]["role"] == "system":
                continue
            case = {"template_name": name, "template": template, "messages": conv, "bos_token": tok.bos_token, "eos_token": tok.eos_token}
            case["text"] = tok.apply_chat_template(conv, chat_template=template, tokenize=False)
            case["prompt_text"] = tok.apply_chat_template(conv[:-1], chat_template=template, tokenize=False, add_generation_prompt=True)
            if "{% generation %}" in template:
                out = tok.apply_chat_template(
                    conv, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                case["ids"] = out["input_ids"]
                case["assistant_mask"] = out["assistant_masks"]
            cases.append(case)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    try:
        tok.apply_chat_template(bad, chat_template=TEMPLATES["mistral_style"], tokenize=False)
    except Exception as e:  # transformers raises TemplateError with the template's message
        cases.append({"template_name": "mistral_style", "template": TEMPLATES["mistral_style"], "messages": bad,
                      "bos_token": tok.bos_token, "eos_token": tok.eos_token, "error": str(e)})
    (DIR / "golden.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"{len(cases)} cases written to {DIR / 'golden.json'}")


if __name__ == "__main__":
    main()

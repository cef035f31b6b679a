"""TRL's own trainers, 5 steps each, on a tiny committed model and data: the reference kiln's
`trl_side_by_side` tests hold `kiln sft`, `kiln dpo`, `kiln kto` and `kiln rm` to, step by step.

Both sides do the same work: every step is the whole training set in one batch (so sampling
order cannot matter), f32 on the CPU, AdamW (β 0.9/0.999, ε 1e-8, no weight decay), gradient
clipping at 1.0, and the same schedule (linear decay after one warm-up step). SFT trains on
the assistant turns (`assistant_only_loss`, from the template's {% generation %} markers),
DPO with the sigmoid loss at β 0.1, KTO at β 0.1 with its KL reference point from the batch's
completions rotated by one (TRL requires sequential sampling for it; one batch makes kiln's
micro-batch the same set in the same order), the reward model on the DPO pairs with TRL's
per-row `margin` column, from a score head initialised here and saved for both sides.

Writes tests/fixtures/trl/:
  model/            a tiny Qwen2 (save_pretrained) with the demo's character tokenizer
  reward_model/      the same with a score head (Qwen2ForSequenceClassification, 1 label)
  sft.jsonl, dpo.jsonl, kto.jsonl, rm.jsonl   conversational rows in TRL's formats
  golden.json       per recipe: what TRL logged at each step (loss, grad_norm, learning_rate,
                    num_tokens, and the recipe's accuracy, rewards, log-probs and KL), and the
                    settings used, for the Rust test to mirror

Run:  python tools/golden/trl_side_by_side.py   (needs torch, transformers, trl, datasets)
"""

import json
import pathlib
import shutil

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "trl"
TOKENIZER = ROOT / "tests" / "fixtures" / "chat"

STEPS = 5
SETTINGS = dict(lr=1e-3, warmup_steps=1, lr_schedule="linear", max_grad_norm=1.0, beta=0.1)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


SUMS = [(a, b) for a, b in [(2, 3), (4, 1), (7, 2), (5, 5), (8, 1), (3, 6), (9, 0), (6, 2)]]

SFT_ROWS = [{"messages": user(f"What is {a} plus {b}?") + assistant(f"{a + b}")} for a, b in SUMS[:6]] + [
    {"messages": [{"role": "system", "content": "Answer briefly."}] + user("Name a colour.") + assistant("Red.")
     + user("Another?") + assistant("Blue.")},
    {"messages": user("Count to 3.") + assistant("1, 2, 3")},
]

DPO_ROWS = [
    {"prompt": user(f"What is {a} plus {b}?"), "chosen": assistant(f"{a + b}"), "rejected": assistant(f"{a + b + 1}!")}
    for a, b in SUMS[:5]
] + [{"prompt": user("Say hi."), "chosen": assistant("Hi."), "rejected": assistant("No.")}]

# TRL's optional `margin` column: the reward gap each pair asks for.
RM_ROWS = [dict(row, margin=0.5 * (i % 3)) for i, row in enumerate(DPO_ROWS)]

KTO_ROWS = [
    {"prompt": user(f"What is {a} plus {b}?"), "completion": assistant(f"{a + b + (i % 2)}"), "label": i % 2 == 0}
    for i, (a, b) in enumerate(SUMS)
]


def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=102, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0)
    return Qwen2ForCausalLM(config).float()


def common(rows):
    """TrainingArguments both sides share: one full batch per step, f32 on the CPU."""
    return dict(output_dir="/tmp/kiln-trl-side-by-side", per_device_train_batch_size=len(rows),
                gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=SETTINGS["lr"],
                lr_scheduler_type=SETTINGS["lr_schedule"], warmup_steps=SETTINGS["warmup_steps"],
                weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
                max_grad_norm=SETTINGS["max_grad_norm"], logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, bf16=False, seed=0, data_seed=0)


METRICS = ["loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "rewards/chosen",
           "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "kl",
           "accuracy", "margin", "mean_reward"]


def logged(trainer):
    """Per step: each of METRICS that TRL logged."""
    steps = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    assert len(steps) == STEPS, trainer.state.log_history
    return {k: [float(h[k]) for h in steps] for k in METRICS if k in steps[0]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    base = OUT / "model"
    if base.exists():
        shutil.rmtree(base)
    model().save_pretrained(base)
    tok.save_pretrained(base)
    # The reward model starts from the base with a score head initialised here, so that both
    # sides start from the same head.
    torch.manual_seed(1)
    reward_model = Qwen2ForSequenceClassification.from_pretrained(base, num_labels=1)
    reward_model.config.pad_token_id = tok.pad_token_id
    reward_model.save_pretrained(OUT / "reward_model")
    tok.save_pretrained(OUT / "reward_model")
    for name, rows in [("sft", SFT_ROWS), ("dpo", DPO_ROWS), ("kto", KTO_ROWS), ("rm", RM_ROWS)]:
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    golden = {"settings": SETTINGS, "steps": STEPS}
    sft = SFTTrainer(model=Qwen2ForCausalLM.from_pretrained(base), processing_class=tok,
                     train_dataset=Dataset.from_list(SFT_ROWS),
                     args=SFTConfig(**common(SFT_ROWS), assistant_only_loss=True, max_length=None))
    sft.train()
    golden["sft"] = logged(sft)

    dpo = DPOTrainer(model=Qwen2ForCausalLM.from_pretrained(base), processing_class=tok,
                     train_dataset=Dataset.from_list(DPO_ROWS),
                     args=DPOConfig(**common(DPO_ROWS), beta=SETTINGS["beta"], loss_type=["sigmoid"], max_length=None))
    dpo.train()
    golden["dpo"] = logged(dpo)

    kto = KTOTrainer(model=Qwen2ForCausalLM.from_pretrained(base), processing_class=tok,
                     train_dataset=Dataset.from_list(KTO_ROWS),
                     args=KTOConfig(**common(KTO_ROWS), beta=SETTINGS["beta"], max_length=None,
                                    train_sampling_strategy="sequential"))
    kto.train()
    golden["kto"] = logged(kto)

    rm = RewardTrainer(model=Qwen2ForSequenceClassification.from_pretrained(OUT / "reward_model"),
                       processing_class=tok, train_dataset=Dataset.from_list(RM_ROWS),
                       args=RewardConfig(**common(RM_ROWS), max_length=None))
    rm.train()
    golden["rm"] = logged(rm)

    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    for name in ("sft", "dpo", "kto", "rm"):
        print(name, golden[name])


if __name__ == "__main__":
    main()

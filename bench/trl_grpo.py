"""TRL's GRPOTrainer on the GRPO benchmark's work, for `kiln grpo bench/grpo.toml` beside it.

Both sides: a randomly initialised Qwen2 (4 layers, hidden 512, 8 heads, MLP 1408) with the demo's
character tokenizer, f32 on the CPU, the prompts of examples/grpo_prompts.jsonl, 8 prompts x 8
completions of up to 64 new tokens per step, temperature 1, an exact-match reward on the
"answer" column, loss "grpo" (mean of sequence means), rewards scaled per group, no KL term
(beta 0), one optimizer step per rollout, AdamW at lr 1e-6, every completion in one
forward/backward (TRL's per-device batch 64, kiln's micro_batch 64).

    python bench/trl_grpo.py --init               # writes the model to runs/bench-grpo/model
    python bench/trl_grpo.py --steps 6            # TRL: seconds per step after the first
    kiln --threads 2 grpo bench/grpo.toml         # kiln: metrics.jsonl's elapsed_s per step
    python bench/trl_grpo.py --dtype bf16         # mixed precision (TRL's bf16=True, CPU autocast)
    kiln --threads 2 grpo bench/grpo.toml --set train.dtype=bf16

Prints the median seconds per step (the first step, with its warm-up, left out) and the mean
completion length, which must be compared too: a step that samples shorter completions is not
faster.
"""

import argparse
import json
import pathlib
import re
import shutil
import statistics
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "bench-grpo" / "model"
TOKENIZER = ROOT / "tests" / "fixtures" / "trl" / "model"
PROMPTS = ROOT / "examples" / "grpo_prompts.jsonl"


def init():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if MODEL.exists():
        shutil.rmtree(MODEL)
    Qwen2ForCausalLM(config).save_pretrained(MODEL)
    tokenizer.save_pretrained(MODEL)
    print(f"wrote {MODEL}")


def exact_match(completions, answer, **_):
    """1 when the completion's last number equals the answer (kiln's exact_match rule)."""
    scores = []
    for completion, want in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        scores.append(float(bool(numbers) and float(numbers[-1]) == float(want)))
    return scores


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = [time.perf_counter()]
        self.lengths = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])


def run(steps, threads, dtype):
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=str(ROOT / "runs" / "bench-grpo" / "trl"),
        use_cpu=True,
        bf16=dtype == "bf16",
        learning_rate=1e-6,
        max_steps=steps,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=64,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.padding_side = "left"
    model = Qwen2ForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    times = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[times],
    )
    times.times = [time.perf_counter()]
    trainer.train()
    per_step = [b - a for a, b in zip(times.times, times.times[1:])]
    timed = per_step[1:] or per_step
    print(f"TRL GRPOTrainer: {steps} steps, {threads} threads, {dtype}")
    print("  seconds per step: " + ", ".join(f"{t:.2f}" for t in per_step))
    print(f"  median {statistics.median(timed):.2f} s per step (first left out)")
    if times.lengths:
        print(f"  mean completion length {statistics.mean(times.lengths):.1f} tokens")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", action="store_true", help="write the random model and exit")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = parser.parse_args()
    if a.init:
        init()
    else:
        run(a.steps, a.threads, a.dtype)


if __name__ == "__main__":
    main()

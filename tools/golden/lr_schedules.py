"""Golden learning rates of every schedule kiln offers, as transformers' `get_scheduler`
gives them to the Hugging Face Trainer (and so TRL): the rate each optimizer step uses, read
before the step (the scheduler steps after the optimizer), for lr 1e-3 over 10 steps with 3
warm-up steps, and 1e-4 as the floor of `cosine_with_min_lr`. Also the warm-up steps of
`warmup_steps = 0.25` (a ratio, as transformers 5 reads a value below 1) over 10 steps.
Writes tests/fixtures/schedule/lr.safetensors.
Run:  python tools/golden/lr_schedules.py
"""

import pathlib

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments
from transformers.optimization import get_scheduler

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "schedule" / "lr.safetensors"
LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 3, 10

tensors = {"params": torch.tensor([LR, MIN_LR, WARMUP, TOTAL], dtype=torch.float64)}
for name in ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=LR)
    kwargs = {"min_lr": MIN_LR} if name == "cosine_with_min_lr" else {}
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=WARMUP, num_training_steps=TOTAL,
                              scheduler_specific_kwargs=kwargs)
    rates = []
    for _ in range(TOTAL):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    tensors[name] = torch.tensor(rates, dtype=torch.float64)
args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=0.25, report_to=[])
tensors["warmup_of_ratio_0.25_over_10"] = torch.tensor([args.get_warmup_steps(10)], dtype=torch.int64)

OUT.parent.mkdir(parents=True, exist_ok=True)
save_file(tensors, str(OUT))
print(f"wrote {OUT}")

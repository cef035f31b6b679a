"""Golden steps of torch.optim.Muon: for three matrices (wide, tall, square) and several
settings, the parameters after each of four steps fed fixed gradients. Muon runs its
Newton-Schulz iteration in bf16, so kiln's must round as PyTorch does to agree.

tests/fixtures/muon/golden.safetensors:
  {shape}.param0           [rows, cols]         the parameters before the first step
  {shape}.grads            [steps, rows, cols]  the gradient fed at each step
  {case}.{shape}.params    [steps, rows, cols]  the parameters after each step
  {case}.settings          [lr, weight_decay, momentum, nesterov, ns_steps, adjust]
                           (adjust: 0 "original", 1 "match_rms_adamw")
Run:  python tools/golden/muon.py   (needs torch >= 2.9, safetensors)
"""

import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "muon" / "golden.safetensors"
SHAPES = {"wide": (6, 10), "tall": (12, 5), "square": (8, 8)}
STEPS = 4
CASES = {
    # name: (lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn)
    "default": (0.02, 0.1, 0.95, True, 5, "original"),
    "match_rms_adamw": (0.01, 0.05, 0.9, True, 5, "match_rms_adamw"),
    "plain_momentum": (0.02, 0.0, 0.95, False, 3, "original"),
}

torch.manual_seed(0)
tensors = {}
for shape_name, shape in SHAPES.items():
    tensors[f"{shape_name}.param0"] = torch.randn(shape) * 0.5
    tensors[f"{shape_name}.grads"] = torch.randn((STEPS, *shape))

for case, (lr, wd, momentum, nesterov, ns_steps, adjust) in CASES.items():
    tensors[f"{case}.settings"] = torch.tensor(
        [lr, wd, momentum, float(nesterov), ns_steps, 0.0 if adjust == "original" else 1.0], dtype=torch.float64)
    for shape_name in SHAPES:
        param = torch.nn.Parameter(tensors[f"{shape_name}.param0"].clone())
        opt = torch.optim.Muon([param], lr=lr, weight_decay=wd, momentum=momentum, nesterov=nesterov,
                               ns_steps=ns_steps, adjust_lr_fn=adjust)
        after = []
        for step in range(STEPS):
            param.grad = tensors[f"{shape_name}.grads"][step].clone()
            opt.step()
            after.append(param.detach().clone())
        tensors[f"{case}.{shape_name}.params"] = torch.stack(after)

OUT.parent.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
print(f"wrote {OUT} (torch {torch.__version__})")

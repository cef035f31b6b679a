"""Golden steps of torch.optim.Muon: for three matrices (wide, tall, square) and several
settings, the parameters after each of four steps fed fixed gradients. Muon runs its
Newton-Schulz iteration in bf16, so kiln's must round as PyTorch does to agree.

tests/fixtures/muon/golden.safetensors:
  {shape}.param0           [rows, cols]         the parameters before the first step
  {shape}.grads            [steps, rows, cols]  the gradient fed at each step
  {case}.{shape}.params    [steps, rows, cols]  the parameters after each step
  {case}.settings          [lr, weight_decay, momentum, nesterov, ns_steps, adjust, schedule]
                           (adjust: 0 "original", 1 "match_rms_adamw"; schedule: 0 torch's,
                           ns_steps iterations of one quintic, 1 DeepSeek-V4's)

DeepSeek-V4's schedule (its report, section on Muon): 10 iterations, the first 8 with
(3.4445, -4.7750, 2.0315) to converge fast, the last 2 with (2, -1.5, 0.5) to settle the
singular values at 1. The "deepseek_v4" case runs torch.optim.Muon with its iteration
(`_zeropower_via_newtonschulz`, same bf16 operations) switching coefficients after step 8.
Run:  python tools/golden/muon.py   (needs torch >= 2.9, safetensors)
"""

import pathlib

import torch
import torch.optim._muon as torch_muon
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "muon" / "golden.safetensors"
SHAPES = {"wide": (6, 10), "tall": (12, 5), "square": (8, 8)}
STEPS = 4
CASES = {
    # name: (lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn, schedule)
    "default": (0.02, 0.1, 0.95, True, 5, "original", "torch"),
    "match_rms_adamw": (0.01, 0.05, 0.9, True, 5, "match_rms_adamw", "torch"),
    "plain_momentum": (0.02, 0.0, 0.95, False, 3, "original", "torch"),
    "deepseek_v4": (0.01, 0.1, 0.95, True, 10, "match_rms_adamw", "deepseek_v4"),
}
TORCH_ITERATION = torch_muon._zeropower_via_newtonschulz
V4_STAGES = [(8, (3.4445, -4.7750, 2.0315)), (2, (2.0, -1.5, 0.5))]


def deepseek_v4_iteration(grad, ns_coefficients, ns_steps, eps):
    """torch's `_zeropower_via_newtonschulz`, op for op, with V4's two stages of coefficients."""
    ortho_grad = grad.to(dtype=torch.bfloat16, copy=True)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for steps, (a, b, c) in V4_STAGES:
        for _ in range(steps):
            gram_matrix = ortho_grad @ ortho_grad.T
            gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
            ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


torch.manual_seed(0)
tensors = {}
for shape_name, shape in SHAPES.items():
    tensors[f"{shape_name}.param0"] = torch.randn(shape) * 0.5
    tensors[f"{shape_name}.grads"] = torch.randn((STEPS, *shape))

for case, (lr, wd, momentum, nesterov, ns_steps, adjust, schedule) in CASES.items():
    tensors[f"{case}.settings"] = torch.tensor(
        [lr, wd, momentum, float(nesterov), ns_steps, 0.0 if adjust == "original" else 1.0,
         0.0 if schedule == "torch" else 1.0], dtype=torch.float64)
    torch_muon._zeropower_via_newtonschulz = TORCH_ITERATION if schedule == "torch" else deepseek_v4_iteration
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

"""Golden values for `kiln distill`'s loss: the per-token reverse KL of the student from the
teacher over the full vocabulary, KL(p_student || p_teacher) = sum_v p_s(v) (log p_s(v) -
log p_t(v)), averaged over tokens, and its gradient with respect to the student's logits
(torch autograd).
Writes tests/fixtures/distill/reverse_kl.safetensors.
Run:  python tools/golden/distill_loss.py
"""

import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "distill" / "reverse_kl.safetensors"
gen = torch.Generator().manual_seed(5)
tokens, vocab = 6, 11
student = (2 * torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)).requires_grad_()
teacher = 2 * torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
log_p = torch.log_softmax(student, -1)
log_q = torch.log_softmax(teacher, -1)
kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
kl.backward()
save_file({
    "student": student.detach().float().contiguous(),
    "teacher": teacher.float().contiguous(),
    "loss": kl.detach().reshape(()),
    "dstudent": student.grad.contiguous(),
}, OUT)
print("wrote", OUT, kl.item())

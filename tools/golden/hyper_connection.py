"""Golden mixing weights of DeepSeek-V4's manifold-constrained hyper-connections (transformers'
`DeepseekV4HyperConnection`, and `DeepseekV4HyperHead` for the top), from the streams'
projection `mixes`, with the gradients of a random loss by autograd. The weights are
recomputed here from `mixes` with the module's formulas, and checked against the module's own
outputs (post, comb, and the collapse that consumes pre) first.

tests/fixtures/hyper_connection/golden.safetensors, for hc in (2, 4):
  hc{hc}.mixes [tokens, (2+hc)·hc]   hc{hc}.base [(2+hc)·hc]   hc{hc}.scale [3]
  hc{hc}.out   [tokens, (2+hc)·hc]   pre (hc), post (hc), comb (hc·hc, row-major) per token
  hc{hc}.dout  [tokens, (2+hc)·hc]   the loss's gradient with respect to out
  hc{hc}.dmixes, hc{hc}.dbase, hc{hc}.dscale
  hc{hc}.head.{mixes [tokens, hc], base [hc], scale [1], out [tokens, hc], dout, dmixes, dbase, dscale}
  settings [iters, eps]
Run:  python tools/golden/hyper_connection.py   (needs torch, transformers >= 5.2, safetensors)
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hyper_connection" / "golden.safetensors"
TOKENS, HIDDEN, ITERS, EPS = 5, 8, 20, 1e-6
torch.manual_seed(0)


def weights(mixes, base, scale, hc):
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + EPS
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.view(-1, hc, hc) * scale[2] + comb_b.view(hc, hc), dim=-1) + EPS
    comb = comb / (comb.sum(dim=-2, keepdim=True) + EPS)
    for _ in range(ITERS - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + EPS)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + EPS)
    return torch.cat([pre, post, comb.flatten(1)], dim=-1)


tensors = {"settings": torch.tensor([ITERS, EPS], dtype=torch.float64)}
for hc in (2, 4):
    config = DeepseekV4Config(hidden_size=HIDDEN, hc_mult=hc, hc_sinkhorn_iters=ITERS, hc_eps=EPS, rms_norm_eps=1e-6)
    module = DeepseekV4HyperConnection(config)
    with torch.no_grad():
        module.fn.normal_(0, 0.5)
        module.base.normal_(0, 0.5)
        module.scale.copy_(torch.tensor([0.7, 1.3, 2.0]))
    streams = torch.randn(1, TOKENS, hc, HIDDEN)
    mixes = F.linear(module.input_norm(streams.view(1, TOKENS, -1)), module.fn).view(TOKENS, -1)
    out = weights(mixes, module.base, module.scale, hc)
    # Anchor to the module: its post, comb and collapse (Σ pre·stream).
    post, comb, collapsed = module(streams)
    assert torch.allclose(out[:, hc:2 * hc], post.view(TOKENS, hc), atol=1e-6)
    assert torch.allclose(out[:, 2 * hc:], comb.reshape(TOKENS, -1), atol=1e-6)
    assert torch.allclose((out[:, :hc, None] * streams[0]).sum(1), collapsed[0], atol=1e-5)
    leaves = [mixes.detach().clone().requires_grad_(), module.base.detach().clone().requires_grad_(),
              module.scale.detach().clone().requires_grad_()]
    out = weights(*leaves, hc)
    dout = torch.randn_like(out)
    out.backward(dout)
    for name, value in [("mixes", leaves[0]), ("base", leaves[1]), ("scale", leaves[2]), ("out", out), ("dout", dout)]:
        tensors[f"hc{hc}.{name}"] = value.detach().clone()
    for name, leaf in zip(["mixes", "base", "scale"], leaves):
        tensors[f"hc{hc}.d{name}"] = leaf.grad.clone()

    head = DeepseekV4HyperHead(config)
    with torch.no_grad():
        head.hc_fn.normal_(0, 0.5)
        head.hc_base.normal_(0, 0.5)
        head.hc_scale.fill_(0.9)
    hmixes = F.linear(head.input_norm(streams.view(1, TOKENS, -1)), head.hc_fn).view(TOKENS, hc)
    hleaves = [hmixes.detach().clone().requires_grad_(), head.hc_base.detach().clone().requires_grad_(),
               head.hc_scale.detach().clone().requires_grad_()]
    hout = torch.sigmoid(hleaves[0] * hleaves[2] + hleaves[1]) + EPS
    assert torch.allclose((hout.detach()[:, :, None] * streams[0]).sum(1), head(streams)[0], atol=1e-5)
    hdout = torch.randn_like(hout)
    hout.backward(hdout)
    for name, value in [("mixes", hleaves[0]), ("base", hleaves[1]), ("scale", hleaves[2]), ("out", hout), ("dout", hdout)]:
        tensors[f"hc{hc}.head.{name}"] = value.detach().clone()
    for name, leaf in zip(["mixes", "base", "scale"], hleaves):
        tensors[f"hc{hc}.head.d{name}"] = leaf.grad.clone()

OUT.parent.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT))
print(f"wrote {OUT}")

//! The dense SwiGLU MLP: `out = (silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ` (+ biases).
//!
//! Backward: dh = dout·Wd;  dgate, dup = swiglu'(dh);  dx = dgate·Wg + dup·Wu.

use super::{linear, linear_backward};
use crate::weights::MlpWeights;
use kiln_core::{Backend, Precision};

/// What forward keeps for backward.
pub struct MlpActs<B: Backend> {
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
}

/// Gradient scratch, shared by all layers.
pub struct MlpGrads<B: Backend> {
    dh: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
}

impl<B: Backend> MlpActs<B> {
    pub fn new(b: &B, tokens: usize, ff: usize) -> Self {
        Self { gate: b.zeros(tokens * ff), up: b.zeros(tokens * ff), h: b.zeros(tokens * ff) }
    }
}

impl<B: Backend> MlpGrads<B> {
    pub fn new(b: &B, tokens: usize, ff: usize) -> Self {
        Self { dh: b.zeros(tokens * ff), dgate: b.zeros(tokens * ff), dup: b.zeros(tokens * ff) }
    }
}

/// `out = mlp(x)` for `[tokens, d]` x; with `out` `None` only what backward needs is computed.
pub fn forward<B: Backend>(
    b: &B,
    p: Precision,
    w: &MlpWeights<&B::Slice>,
    x: &B::Slice,
    out: Option<&mut B::Slice>,
    a: &mut MlpActs<B>,
    (n, d, ff): (usize, usize, usize),
) {
    linear(b, p, &mut a.gate, x, (w.gate, w.gate_bias), (n, d, ff));
    linear(b, p, &mut a.up, x, (w.up, w.up_bias), (n, d, ff));
    b.swiglu_forward(&mut a.h, &a.gate, &a.up, f32::INFINITY);
    if let Some(out) = out {
        linear(b, p, out, &a.h, (w.down, w.down_bias), (n, ff, d));
    }
}

/// Backward of `forward`: overwrites `dx` and adds parameter gradients into `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    b: &B,
    p: Precision,
    w: &MlpWeights<&B::Slice>,
    x: &B::Slice,
    dout: &B::Slice,
    dx: &mut B::Slice,
    g: &mut MlpWeights<&mut B::Slice>,
    a: &MlpActs<B>,
    s: &mut MlpGrads<B>,
    (n, d, ff): (usize, usize, usize),
) {
    linear_backward(
        b,
        p,
        Some((&mut s.dh, false)),
        (&mut g.down, g.down_bias.as_deref_mut()),
        dout,
        &a.h,
        w.down,
        (n, ff, d),
    );
    b.swiglu_backward(&mut s.dgate, &mut s.dup, &s.dh, &a.gate, &a.up, f32::INFINITY);
    linear_backward(
        b,
        p,
        Some((&mut *dx, false)),
        (&mut g.gate, g.gate_bias.as_deref_mut()),
        &s.dgate,
        x,
        w.gate,
        (n, d, ff),
    );
    linear_backward(b, p, Some((dx, true)), (&mut g.up, g.up_bias.as_deref_mut()), &s.dup, x, w.up, (n, d, ff));
}

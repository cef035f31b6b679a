//! The blocks a decoder layer is made of, each with its forward, its backward, and the
//! activations and gradient scratch it needs: attention (grouped-query or multi-head latent)
//! and feed-forward (dense SwiGLU or DeepSeekMoE).

pub mod gqa;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod moe_aux_loss;

use kiln_core::{Attention, Backend, Matmul};

/// What an attention block reads besides its input: the batch's positions and segments.
pub struct AttnCtx<'a, B: Backend> {
    pub tokens: usize,
    pub rope_table: &'a B::Buf,
    pub positions: &'a B::Index,
    pub segments: &'a B::Index,
    pub spec: Attention,
}

/// `y = x·Wᵀ (+ bias)` for `rows` rows.
pub(crate) fn linear<B: Backend>(
    b: &B,
    y: &mut B::Buf,
    x: &B::Buf,
    (w, bias): (&B::Buf, Option<&B::Buf>),
    (rows, d_in, d_out): (usize, usize, usize),
) {
    b.matmul(y, x, w, Matmul::linear(rows, d_in, d_out));
    if let Some(bias) = bias {
        b.add_bias(y, bias);
    }
}

/// Backward of `linear`: `dW += dyᵀ·x`, `dbias += Σ dy`, and `dx (+)= dy·W` when asked
/// (`(dx, accumulate)`).
pub(crate) fn linear_backward<B: Backend>(
    b: &B,
    dx: Option<(&mut B::Buf, bool)>,
    (dw, dbias): (&mut B::Buf, Option<&mut B::Buf>),
    dy: &B::Buf,
    x: &B::Buf,
    w: &B::Buf,
    (rows, d_in, d_out): (usize, usize, usize),
) {
    b.matmul(dw, dy, x, Matmul::linear_dw(rows, d_in, d_out));
    if let Some(db) = dbias {
        b.bias_backward(db, dy);
    }
    if let Some((dx, accumulate)) = dx {
        b.matmul(dx, dy, w, Matmul::linear_dx(rows, d_in, d_out, accumulate));
    }
}

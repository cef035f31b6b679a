//! Grouped-query attention (Llama family).
//!
//!   q, k, v = x·W{q,k,v}ᵀ (+b);  [Qwen3: q, k = RMSNorm per head]
//!   q, k = RoPE(q, k);  out = Attention(q, k, v)·Woᵀ (+b)
//!
//! Backward runs the same steps in reverse; RoPE's backward is the inverse rotation.

use super::{attend, linear, linear_backward, AttnCtx};
use crate::config::Config;
use crate::tensor_parallel::TensorParallel;
use crate::weights::GqaWeights;
use kiln_core::{Backend, Heads, Rope};

/// What forward keeps for backward.
pub struct GqaActs<B: Backend> {
    /// q and k before their per-head RMSNorm (Qwen3), with that norm's 1/rms.
    q_raw: Option<(B::Buf, B::Buf)>,
    k_raw: Option<(B::Buf, B::Buf)>,
    /// q and k after RoPE.
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    lse: B::Buf,
}

/// Gradient scratch, shared by all layers.
pub struct GqaGrads<B: Backend> {
    datt: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    /// Gradients of q and k before their per-head norm (Qwen3).
    dq_raw: Option<B::Buf>,
    dk_raw: Option<B::Buf>,
    /// This backward's gradients of the two norms' weights (Qwen3), summed over a tensor group
    /// before they are added.
    dnorms: Option<(B::Buf, B::Buf)>,
}

fn widths(c: &Config) -> (usize, usize) {
    (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim)
}

impl<B: Backend> GqaActs<B> {
    pub fn new(b: &B, c: &Config, n: usize) -> Self {
        let (qd, kvd) = widths(c);
        let norm_pair = |width: usize, heads: usize| c.qk_norm.then(|| (b.zeros(n * width), b.zeros(n * heads)));
        Self {
            q_raw: norm_pair(qd, c.num_heads),
            k_raw: norm_pair(kvd, c.num_kv_heads),
            q: b.zeros(n * qd),
            k: b.zeros(n * kvd),
            v: b.zeros(n * kvd),
            att: b.zeros(n * qd),
            lse: b.zeros(n * c.num_heads),
        }
    }
}

impl<B: Backend> GqaGrads<B> {
    pub fn new(b: &B, c: &Config, n: usize) -> Self {
        let (qd, kvd) = widths(c);
        Self {
            datt: b.zeros(n * qd),
            dq: b.zeros(n * qd),
            dk: b.zeros(n * kvd),
            dv: b.zeros(n * kvd),
            dq_raw: c.qk_norm.then(|| b.zeros(n * qd)),
            dk_raw: c.qk_norm.then(|| b.zeros(n * kvd)),
            dnorms: c.qk_norm.then(|| (b.zeros(c.head_dim), b.zeros(c.head_dim))),
        }
    }
}

fn rope_spec(c: &Config, tokens: usize, heads: usize) -> Rope {
    Rope { x: Heads { tokens, heads, head_dim: c.head_dim }, rot_dim: c.rot_dim, offset: 0, interleaved: false }
}

/// `out = attention(xn)`; with a layer cache `kv`, keys and values go into it as `ctx` says.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &B,
    c: &Config,
    w: &GqaWeights<&B::Slice>,
    xn: &B::Slice,
    out: &mut B::Slice,
    a: &mut GqaActs<B>,
    ctx: &AttnCtx<B>,
    kv: Option<(&mut B::Slice, &mut B::Slice)>,
) {
    let (n, d, eps) = (ctx.tokens, c.hidden_size, c.rms_norm_eps);
    let (qd, kvd) = widths(c);
    match (&mut a.q_raw, &mut a.k_raw, &w.q_norm, &w.k_norm) {
        (Some((q_raw, q_rstd)), Some((k_raw, k_rstd)), Some(q_norm), Some(k_norm)) => {
            linear(b, ctx.precision, q_raw, xn, (w.q, w.q_bias), (n, d, qd));
            linear(b, ctx.precision, k_raw, xn, (w.k, w.k_bias), (n, d, kvd));
            b.rmsnorm_forward(&mut a.q, q_rstd, q_raw, q_norm, eps);
            b.rmsnorm_forward(&mut a.k, k_rstd, k_raw, k_norm, eps);
        }
        _ => {
            linear(b, ctx.precision, &mut a.q, xn, (w.q, w.q_bias), (n, d, qd));
            linear(b, ctx.precision, &mut a.k, xn, (w.k, w.k_bias), (n, d, kvd));
        }
    }
    linear(b, ctx.precision, &mut a.v, xn, (w.v, w.v_bias), (n, d, kvd));
    b.rope_forward(&mut a.q, ctx.rope_table, ctx.positions, rope_spec(c, n, c.num_heads));
    b.rope_forward(&mut a.k, ctx.rope_table, ctx.positions, rope_spec(c, n, c.num_kv_heads));
    attend(b, (&mut a.att, &mut a.lse), &a.q, (&a.k, &a.v), (kvd, kvd), kv, ctx);
    linear(b, ctx.precision, out, &a.att, (w.o, w.o_bias), (n, qd, d));
}

/// Backward of `forward`: overwrites `dxn` with dL/dxn and adds parameter gradients into `g`.
/// Under tensor parallel (`tp`, this rank holding some of the heads) the q/k norms' weight
/// gradients, which sum over every head, are summed over the group; dxn is left partial.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    b: &B,
    c: &Config,
    w: &GqaWeights<&B::Slice>,
    xn: &B::Slice,
    dout: &B::Slice,
    dxn: &mut B::Slice,
    g: &mut GqaWeights<&mut B::Slice>,
    a: &GqaActs<B>,
    s: &mut GqaGrads<B>,
    ctx: &AttnCtx<B>,
    tp: Option<&TensorParallel<B>>,
) {
    let (n, d) = (ctx.tokens, c.hidden_size);
    let (qd, kvd) = widths(c);
    linear_backward(
        b,
        ctx.precision,
        Some((&mut s.datt, false)),
        (&mut g.o, g.o_bias.as_deref_mut()),
        dout,
        &a.att,
        w.o,
        (n, qd, d),
    );
    b.attention_backward(
        &mut s.dq,
        &mut s.dk,
        &mut s.dv,
        &s.datt,
        &a.q,
        &a.k,
        &a.v,
        &a.att,
        &a.lse,
        ctx.segments,
        ctx.spec,
    );
    b.rope_backward(&mut s.dq, ctx.rope_table, ctx.positions, rope_spec(c, n, c.num_heads));
    b.rope_backward(&mut s.dk, ctx.rope_table, ctx.positions, rope_spec(c, n, c.num_kv_heads));
    let (dq, dk) = match (&a.q_raw, &a.k_raw, &mut s.dq_raw, &mut s.dk_raw, &mut g.q_norm, &mut g.k_norm) {
        (Some((q_raw, q_rstd)), Some((k_raw, k_rstd)), Some(dq_raw), Some(dk_raw), Some(dqn), Some(dkn)) => {
            let (q_norm, k_norm) = (w.q_norm.expect("q_norm"), w.k_norm.expect("k_norm"));
            b.fill(dq_raw, 0.0);
            b.fill(dk_raw, 0.0);
            match (tp, &mut s.dnorms) {
                (Some(tp), Some((dq_here, dk_here))) => {
                    b.fill(dq_here, 0.0);
                    b.fill(dk_here, 0.0);
                    b.rmsnorm_backward(dq_raw, dq_here, &s.dq, q_raw, q_norm, q_rstd);
                    b.rmsnorm_backward(dk_raw, dk_here, &s.dk, k_raw, k_norm, k_rstd);
                    tp.sum(dq_here, "q norm gradient");
                    tp.sum(dk_here, "k norm gradient");
                    b.add_assign(dqn, dq_here);
                    b.add_assign(dkn, dk_here);
                }
                _ => {
                    b.rmsnorm_backward(dq_raw, dqn, &s.dq, q_raw, q_norm, q_rstd);
                    b.rmsnorm_backward(dk_raw, dkn, &s.dk, k_raw, k_norm, k_rstd);
                }
            }
            (&*dq_raw, &*dk_raw)
        }
        _ => (&s.dq, &s.dk),
    };
    linear_backward(b, ctx.precision, Some((dxn, false)), (&mut g.q, g.q_bias.as_deref_mut()), dq, xn, w.q, (n, d, qd));
    linear_backward(b, ctx.precision, Some((dxn, true)), (&mut g.k, g.k_bias.as_deref_mut()), dk, xn, w.k, (n, d, kvd));
    linear_backward(
        b,
        ctx.precision,
        Some((dxn, true)),
        (&mut g.v, g.v_bias.as_deref_mut()),
        &s.dv,
        xn,
        w.v,
        (n, d, kvd),
    );
}

//! DeepSeek-V4's attention (transformers' `DeepseekV4Attention`), its sliding-window part:
//!
//!   q = RMSNorm₁(RMSNorm(x·W_qaᵀ)·W_qbᵀ)      (the outer norm unweighted, per head)
//!   kv = RMSNorm(x·W_kvᵀ)                      (one head, both key and value)
//!   q, kv = RoPE(q, kv) on the last `rot_dim` features of each head (pairs 2i, 2i+1)
//!   a = Attention(q, kv, kv) with the window and a sink per head
//!   a = RoPE⁻¹(a) at the query's position      (undoes the rotation the value carried)
//!   out = concat_g(a_g·W_oa,gᵀ)·W_obᵀ          (heads in `o_groups` groups, each projected
//!                                               to `o_lora_rank`, then mixed)
//!
//! Backward runs the same steps in reverse: RoPE⁻¹'s backward is RoPE, the key and value
//! gradients add up (they are one tensor), and the sinks' gradient comes from
//! `attention_sinks_backward`.

use super::v4_compressed::{self, CompressedActs, CompressedGrads};
use super::{linear, linear_backward, v4_decode, AttnCtx};
use crate::config::Config;
use crate::config_v4::V4Config;
use crate::tensor_parallel::TensorParallel;
use crate::v4_cache::{LayerStep, V4LayerCache};
use crate::weights::V4AttnWeights;
use kiln_core::{Backend, ColumnCopy, Heads, Matmul, Rope};

/// Sizes, named as in the formulas above.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    d: usize,
    h: usize,
    hd: usize,
    rot: usize,
    q_rank: usize,
    groups: usize,
    o_rank: usize,
    eps: f32,
}

impl Dims {
    fn new(c: &Config, n: usize) -> Self {
        let v4 = v4(c);
        Self {
            n,
            d: c.hidden_size,
            h: c.num_heads,
            hd: c.head_dim,
            rot: c.rot_dim,
            q_rank: v4.q_lora_rank,
            groups: v4.o_groups,
            o_rank: v4.o_lora_rank,
            eps: c.rms_norm_eps,
        }
    }
    fn rope(&self, heads: usize) -> Rope {
        let x = Heads { tokens: self.n, heads, head_dim: self.hd };
        Rope { x, rot_dim: self.rot, offset: self.hd - self.rot, interleaved: true }
    }
    /// Features of one output group.
    fn group_width(&self) -> usize {
        self.h * self.hd / self.groups
    }
    /// Group `g`'s columns of a `[n, groups·width]` tensor, to (`gather`) or from its block of
    /// a `[groups, n, width]` one.
    fn group(&self, g: usize, width: usize, gather: bool) -> ColumnCopy {
        let wide = (self.groups * width, g * width);
        if gather {
            ColumnCopy::take_block(self.n, width, wide)
        } else {
            ColumnCopy::put_block(self.n, width, wide)
        }
    }
    /// Every group's `[n, k]·W_gᵀ`-shaped product, `W` stored `[groups, out, k]`.
    fn grouped(&self, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Matmul {
        Matmul {
            m,
            n,
            k,
            trans_a,
            trans_b,
            batch: self.groups,
            accumulate,
            precision: kiln_core::Precision::F32,
            b_is_weight: false,
        }
    }
}

fn v4(c: &Config) -> &V4Config {
    match &c.attention {
        crate::config::AttentionKind::V4(v4) => v4,
        _ => panic!("DeepSeek-V4 attention on a config of another attention"),
    }
}

/// What forward keeps for backward.
pub struct V4AttnActs<B: Backend> {
    q_a: B::Buf,
    q_a_norm: B::Buf,
    q_a_rstd: B::Buf,
    /// q before its per-head norm, that norm's 1/rms, and q after it and RoPE.
    q_raw: B::Buf,
    q_rstd: B::Buf,
    q: B::Buf,
    kv_raw: B::Buf,
    kv_rstd: B::Buf,
    kv: B::Buf,
    /// The attention's output (sinks included) and log-sum-exp, for its backward.
    att: B::Buf,
    lse: B::Buf,
    /// `att` rotated back, gathered by group (`[groups, n, width]`), projected (`[groups, n,
    /// o_rank]`) and laid side by side (`[n, groups·o_rank]`).
    rotated_back: B::Buf,
    grouped: B::Buf,
    o_a: B::Buf,
    o_flat: B::Buf,
    /// The compressed entries' part, where the model has compressed layers.
    compressed: Option<CompressedActs<B>>,
}

/// Gradient scratch, shared by all layers.
pub struct V4AttnGrads<B: Backend> {
    compressed: Option<CompressedGrads<B>>,
    do_flat: B::Buf,
    do_a: B::Buf,
    dgrouped: B::Buf,
    datt: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dq_raw: B::Buf,
    dq_a_norm: B::Buf,
    dq_a: B::Buf,
    dkv_raw: B::Buf,
    /// The gradient of the per-head norm's weight of ones, not wanted.
    dones: B::Buf,
}

impl<B: Backend> V4AttnActs<B> {
    pub fn new(b: &B, c: &Config, n: usize) -> Self {
        let m = Dims::new(c, n);
        let (qd, or) = (m.h * m.hd, m.groups * m.o_rank);
        Self {
            q_a: b.zeros(n * m.q_rank),
            q_a_norm: b.zeros(n * m.q_rank),
            q_a_rstd: b.zeros(n),
            q_raw: b.zeros(n * qd),
            q_rstd: b.zeros(n * m.h),
            q: b.zeros(n * qd),
            kv_raw: b.zeros(n * m.hd),
            kv_rstd: b.zeros(n),
            kv: b.zeros(n * m.hd),
            att: b.zeros(n * qd),
            lse: b.zeros(n * m.h),
            rotated_back: b.zeros(n * qd),
            grouped: b.zeros(n * qd),
            o_a: b.zeros(n * or),
            o_flat: b.zeros(n * or),
            compressed: CompressedActs::new(b, c, v4(c), n),
        }
    }
}

impl<B: Backend> V4AttnGrads<B> {
    pub fn new(b: &B, c: &Config, n: usize) -> Self {
        let m = Dims::new(c, n);
        let (qd, or) = (m.h * m.hd, m.groups * m.o_rank);
        Self {
            compressed: CompressedGrads::new(b, c, v4(c), n),
            do_flat: b.zeros(n * or),
            do_a: b.zeros(n * or),
            dgrouped: b.zeros(n * qd),
            datt: b.zeros(n * qd),
            dq: b.zeros(n * qd),
            dk: b.zeros(n * m.hd),
            dv: b.zeros(n * m.hd),
            dq_raw: b.zeros(n * qd),
            dq_a_norm: b.zeros(n * m.q_rank),
            dq_a: b.zeros(n * m.q_rank),
            dkv_raw: b.zeros(n * m.hd),
            dones: b.zeros(m.hd),
        }
    }
}

/// `out = attention(xn)`. `ones` holds at least `head_dim` ones (the per-head norm's weight).
/// With a generation cache, a prefill also stores what later tokens read, and a decode step
/// attends what is cached (`v4_decode`).
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &B,
    cfg: &Config,
    w: &V4AttnWeights<&B::Slice>,
    xn: &B::Slice,
    out: &mut B::Slice,
    a: &mut V4AttnActs<B>,
    ctx: &AttnCtx<B>,
    ones: &B::Slice,
    cache: Option<(&mut V4LayerCache<B>, &LayerStep<B>)>,
) {
    let m = Dims::new(cfg, ctx.tokens);
    let (n, d, h, hd, p) = (m.n, m.d, m.h, m.hd, ctx.precision);
    linear(b, p, &mut a.q_a, xn, (w.q_a, None), (n, d, m.q_rank));
    b.rmsnorm_forward(&mut a.q_a_norm, &mut a.q_a_rstd, &a.q_a, w.q_a_norm, m.eps);
    linear(b, p, &mut a.q_raw, &a.q_a_norm, (w.q_b, None), (n, m.q_rank, h * hd));
    b.rmsnorm_forward(&mut a.q, &mut a.q_rstd, &a.q_raw, b.slice(ones, 0..hd), m.eps);
    b.rope_forward(&mut a.q, ctx.rope_table, ctx.positions, m.rope(h));

    linear(b, p, &mut a.kv_raw, xn, (w.kv, None), (n, d, hd));
    b.rmsnorm_forward(&mut a.kv, &mut a.kv_rstd, &a.kv_raw, w.kv_norm, m.eps);
    b.rope_forward(&mut a.kv, ctx.rope_table, ctx.positions, m.rope(1));

    match cache {
        Some(cache) if cache.1.window.is_some() => {
            let inputs = (xn, &*a.q_a_norm, &*a.q, &*a.kv);
            let att = (&mut *a.att, &mut *a.lse);
            v4_decode::attend(b, cfg, v4(cfg), w, inputs, att, a.compressed.as_mut(), cache, ctx);
        }
        cache => {
            b.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.kv, &a.kv, ctx.segments, ctx.spec);
            if let Some(plan) = ctx.compressed {
                let ca = a.compressed.as_mut().expect("compressed attention buffers");
                let inputs = (xn, &*a.q_a_norm, &*a.q);
                v4_compressed::forward(b, cfg, v4(cfg), w, inputs, (&mut a.att, &mut a.lse), ca, ctx, plan);
            }
            if let Some(cache) = cache {
                v4_decode::store_prefill(b, cfg, v4(cfg), &a.kv, a.compressed.as_ref(), cache, n);
            }
        }
    }
    b.attention_sinks_forward(&mut a.att, &mut a.lse, w.sinks, ctx.spec);

    // Rotated back, by group into [groups, n, width], each group projected to o_rank.
    let (gw, or) = (m.group_width(), m.o_rank);
    b.copy(&mut a.rotated_back, &a.att);
    b.rope_backward(&mut a.rotated_back, ctx.rope_table, ctx.positions, m.rope(h));
    for g in 0..m.groups {
        b.copy_columns(
            b.slice_mut(&mut a.grouped, g * n * gw..(g + 1) * n * gw),
            &a.rotated_back,
            m.group(g, gw, true),
        );
    }
    b.matmul(&mut a.o_a, &a.grouped, w.o_a, m.grouped(n, or, gw, false, true, false).in_precision(p));
    for g in 0..m.groups {
        b.copy_columns(&mut a.o_flat, b.slice(&a.o_a, g * n * or..(g + 1) * n * or), m.group(g, or, false));
    }
    linear(b, p, out, &a.o_flat, (w.o_b, None), (n, m.groups * or, d));
}

/// Backward of `forward`: overwrites `dxn` with dL/dxn and adds parameter gradients into `g`.
/// Under tensor parallel (`tp`, the rank's heads) `dxn` comes out whole: the gradients that sum
/// over heads are summed over the group before the whole parts' backward.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    b: &B,
    cfg: &Config,
    w: &V4AttnWeights<&B::Slice>,
    xn: &B::Slice,
    dout: &B::Slice,
    dxn: &mut B::Slice,
    g: &mut V4AttnWeights<&mut B::Slice>,
    a: &V4AttnActs<B>,
    s: &mut V4AttnGrads<B>,
    ctx: &AttnCtx<B>,
    ones: &B::Slice,
    tp: Option<&TensorParallel<B>>,
) {
    let m = Dims::new(cfg, ctx.tokens);
    let (n, d, h, hd, p) = (m.n, m.d, m.h, m.hd, ctx.precision);
    let (gw, or) = (m.group_width(), m.o_rank);
    // Under tensor parallel, a gradient summed over this rank's heads, summed over the group.
    let over_heads = |buf: &mut B::Slice, what: &str| {
        if let Some(tp) = tp {
            tp.sum(buf, &format!("DeepSeek-V4 attention: {what}"));
        }
    };
    let flat = m.groups * or;
    linear_backward(b, p, Some((&mut s.do_flat, false)), (&mut *g.o_b, None), dout, &a.o_flat, w.o_b, (n, flat, d));
    for grp in 0..m.groups {
        b.copy_columns(b.slice_mut(&mut s.do_a, grp * n * or..(grp + 1) * n * or), &s.do_flat, m.group(grp, or, true));
    }
    b.matmul(g.o_a, &s.do_a, &a.grouped, m.grouped(or, gw, n, true, false, true).in_precision(p));
    b.matmul(&mut s.dgrouped, &s.do_a, w.o_a, m.grouped(n, gw, or, false, false, false).in_precision(p));
    for grp in 0..m.groups {
        b.copy_columns(&mut s.datt, b.slice(&s.dgrouped, grp * n * gw..(grp + 1) * n * gw), m.group(grp, gw, false));
    }
    b.rope_forward(&mut s.datt, ctx.rope_table, ctx.positions, m.rope(h));

    b.attention_sinks_backward(g.sinks, &s.datt, &a.att, &a.lse, w.sinks, ctx.spec);
    b.attention_backward(
        &mut s.dq,
        &mut s.dk,
        &mut s.dv,
        &s.datt,
        &a.q,
        &a.kv,
        &a.kv,
        &a.att,
        &a.lse,
        ctx.segments,
        ctx.spec,
    );
    let compressed = ctx.compressed.map(|plan| {
        let (ca, cs) =
            (a.compressed.as_ref().expect("compressed acts"), s.compressed.as_mut().expect("compressed grads"));
        let inputs = (&*a.q, &*s.datt, &*a.att, &*a.lse);
        v4_compressed::backward_attention(b, cfg, v4(cfg), inputs, &mut s.dq, ca, cs, ctx, plan);
        over_heads(cs.entries_gradient(b, plan.entries * hd), "compressed entries' gradient");
        (plan, ca)
    });

    // The key and the value are one tensor.
    b.add_assign(&mut s.dk, &s.dv);
    over_heads(&mut s.dk, "key/value gradient");
    b.rope_backward(&mut s.dk, ctx.rope_table, ctx.positions, m.rope(1));
    b.fill(&mut s.dkv_raw, 0.0);
    b.rmsnorm_backward(&mut s.dkv_raw, g.kv_norm, &s.dk, &a.kv_raw, w.kv_norm, &a.kv_rstd);
    linear_backward(b, p, Some((&mut *dxn, false)), (&mut *g.kv, None), &s.dkv_raw, xn, w.kv, (n, d, hd));

    b.rope_backward(&mut s.dq, ctx.rope_table, ctx.positions, m.rope(h));
    b.fill(&mut s.dq_raw, 0.0);
    b.rmsnorm_backward(&mut s.dq_raw, &mut s.dones, &s.dq, &a.q_raw, b.slice(ones, 0..hd), &a.q_rstd);
    let dq_a_norm = Some((&mut *s.dq_a_norm, false));
    linear_backward(b, p, dq_a_norm, (&mut *g.q_b, None), &s.dq_raw, &a.q_a_norm, w.q_b, (n, m.q_rank, h * hd));
    over_heads(&mut s.dq_a_norm, "query latent gradient");
    b.fill(&mut s.dq_a, 0.0);
    b.rmsnorm_backward(&mut s.dq_a, g.q_a_norm, &s.dq_a_norm, &a.q_a, w.q_a_norm, &a.q_a_rstd);
    linear_backward(b, p, Some((&mut *dxn, true)), (&mut *g.q_a, None), &s.dq_a, xn, w.q_a, (n, d, m.q_rank));
    if let Some((plan, ca)) = compressed {
        let cs = s.compressed.as_mut().expect("compressed grads");
        v4_compressed::backward_compressor(b, cfg, w, g, xn, dxn, ca, cs, ctx, plan);
    }
}

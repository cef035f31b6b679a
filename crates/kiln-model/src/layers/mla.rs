//! Multi-head latent attention (DeepSeek-V2/V3), as transformers' `DeepseekV3Attention`.
//!
//!   q = W_qb · RMSNorm(W_qa · x)  (or W_q · x),  per head [q_nope ; q_pe]
//!   [c ; k_pe] = W_kva · x;  c' = RMSNorm(c);  per head [k_nope ; v] = W_kvb · c'
//!   q_pe, k_pe = RoPE(q_pe, k_pe)   (k_pe is one head shared by all)
//!   k = [k_nope ; k_pe];  out = Attention(q, k, v)·W_oᵀ
//!
//! The rotation is applied in place on the last `qk_rope_head_dim` features of each head. With
//! `rope_interleave`, transformers rotates pairs (2i, 2i+1) and writes the results de-interleaved
//! (evens then odds); since q and k get the same permutation, scores are identical.
//!
//! Backward runs the same steps in reverse; k_pe's gradient is the sum over heads.
//!
//! Under tensor parallel a rank holds some of the heads (q_b, kv_b and o cut, the rest whole;
//! see `tensor_parallel`): the latents' gradients, sums over every head, are all-reduced over
//! the group, and the whole down-projections' dL/dx is added by rank 0 alone.

use super::{attend, linear, linear_backward, AttnCtx};
use crate::config::{Config, MlaConfig};
use crate::tensor_parallel::TensorParallel;
use crate::weights::MlaWeights;
use kiln_core::{Backend, ColumnCopy, DecodeAttention, Heads, Matmul, Precision, Rope};

/// transformers builds `q_a_layernorm` and `kv_a_layernorm` with the default epsilon.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Sizes, named as in the formulas above.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    d: usize,
    h: usize,
    nope: usize,
    rope: usize,
    v: usize,
    c: usize,
    q_rank: Option<usize>,
    interleaved: bool,
}

impl Dims {
    fn new(cfg: &Config, m: &MlaConfig, n: usize) -> Self {
        Self {
            n,
            d: cfg.hidden_size,
            h: cfg.num_heads,
            nope: m.qk_nope_head_dim,
            rope: m.qk_rope_head_dim,
            v: m.v_head_dim,
            c: m.kv_lora_rank,
            q_rank: m.q_lora_rank,
            interleaved: m.rope_interleave,
        }
    }
    fn qk(&self) -> usize {
        self.nope + self.rope
    }
    fn kv_a(&self) -> usize {
        self.c + self.rope
    }
    fn kv(&self) -> usize {
        self.nope + self.v
    }
    fn q_rope(&self) -> Rope {
        let x = Heads { tokens: self.n, heads: self.h, head_dim: self.qk() };
        Rope { x, rot_dim: self.rope, offset: self.nope, interleaved: self.interleaved }
    }
    fn k_rope(&self) -> Rope {
        let x = Heads { tokens: self.n, heads: 1, head_dim: self.kv_a() };
        Rope { x, rot_dim: self.rope, offset: self.c, interleaved: self.interleaved }
    }
    /// `cols` columns of rows `(src_stride, src_offset)` to `(dst_stride, dst_offset)`.
    fn columns(
        &self,
        rows: usize,
        cols: usize,
        src: (usize, usize),
        dst: (usize, usize),
        accumulate: bool,
    ) -> ColumnCopy {
        ColumnCopy {
            rows,
            cols,
            src_stride: src.0,
            src_offset: src.1,
            dst_stride: dst.0,
            dst_offset: dst.1,
            accumulate,
        }
    }
}

fn dims(c: &Config, n: usize) -> Dims {
    match &c.attention {
        crate::config::AttentionKind::Mla(m) => Dims::new(c, m, n),
        _ => panic!("multi-head latent attention on a config of another attention"),
    }
}

/// What forward keeps for backward.
pub struct MlaActs<B: Backend> {
    /// `W_qa · x`, its normalised form and 1/rms, with a low-rank query.
    q_a: Option<(B::Buf, B::Buf, B::Buf)>,
    /// Queries after RoPE.
    q: B::Buf,
    /// `[c ; k_pe]`, k_pe rotated.
    kv_a: B::Buf,
    c: B::Buf,
    c_norm: B::Buf,
    c_rstd: B::Buf,
    kv: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    /// Scratch of the absorbed decode, laid out on its first use by these activations.
    absorbed: Option<AbsorbedScratch<B>>,
}

/// The absorbed decode's per-head query and output pieces (see [`absorbed_decode`]).
struct AbsorbedScratch<B: Backend> {
    q_head: B::Buf,
    q_absorbed: B::Buf,
    q_latent: B::Buf,
    att_latent: B::Buf,
    o_latent: B::Buf,
    o_head: B::Buf,
}

impl<B: Backend> AbsorbedScratch<B> {
    fn new(b: &B, m: &Dims) -> Self {
        let (n, h) = (m.n, m.h);
        Self {
            q_head: b.zeros(n * m.nope),
            q_absorbed: b.zeros(n * m.c),
            q_latent: b.zeros(n * h * m.kv_a()),
            att_latent: b.zeros(n * h * m.c),
            o_latent: b.zeros(n * m.c),
            o_head: b.zeros(n * m.v),
        }
    }
}

/// Gradient scratch, shared by all layers.
pub struct MlaGrads<B: Backend> {
    datt: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    dkv: B::Buf,
    dkv_a: B::Buf,
    dc_norm: B::Buf,
    dc: B::Buf,
    /// Gradients of the normalised and raw low-rank query.
    dq_a: Option<(B::Buf, B::Buf)>,
}

impl<B: Backend> MlaActs<B> {
    pub fn new(b: &B, cfg: &Config, n: usize) -> Self {
        let m = dims(cfg, n);
        Self {
            q_a: m.q_rank.map(|r| (b.zeros(n * r), b.zeros(n * r), b.zeros(n))),
            q: b.zeros(n * m.h * m.qk()),
            kv_a: b.zeros(n * m.kv_a()),
            c: b.zeros(n * m.c),
            c_norm: b.zeros(n * m.c),
            c_rstd: b.zeros(n),
            kv: b.zeros(n * m.h * m.kv()),
            k: b.zeros(n * m.h * m.qk()),
            v: b.zeros(n * m.h * m.v),
            att: b.zeros(n * m.h * m.v),
            lse: b.zeros(n * m.h),
            absorbed: None,
        }
    }
}

impl<B: Backend> MlaGrads<B> {
    pub fn new(b: &B, cfg: &Config, n: usize) -> Self {
        let m = dims(cfg, n);
        Self {
            datt: b.zeros(n * m.h * m.v),
            dq: b.zeros(n * m.h * m.qk()),
            dk: b.zeros(n * m.h * m.qk()),
            dv: b.zeros(n * m.h * m.v),
            dkv: b.zeros(n * m.h * m.kv()),
            dkv_a: b.zeros(n * m.kv_a()),
            dc_norm: b.zeros(n * m.c),
            dc: b.zeros(n * m.c),
            dq_a: m.q_rank.map(|r| (b.zeros(n * r), b.zeros(n * r))),
        }
    }
}

/// `out = attention(xn)`; with a layer cache `kv`, the per-head keys and values go into it as
/// `ctx` says.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &B,
    cfg: &Config,
    w: &MlaWeights<&B::Slice>,
    xn: &B::Slice,
    out: &mut B::Slice,
    a: &mut MlaActs<B>,
    ctx: &AttnCtx<B>,
    kv: Option<(&mut B::Slice, &mut B::Slice)>,
) {
    let m = dims(cfg, ctx.tokens);
    let (n, d, h) = (m.n, m.d, m.h);
    match (&mut a.q_a, &w.q_a, &w.q_a_norm, &w.q_b, m.q_rank) {
        (Some((q_a, q_a_norm, q_a_rstd)), Some(wa), Some(wn), Some(wb), Some(r)) => {
            linear(b, ctx.precision, q_a, xn, (wa, w.q_a_bias), (n, d, r));
            b.rmsnorm_forward(q_a_norm, q_a_rstd, q_a, wn, LATENT_NORM_EPS);
            linear(b, ctx.precision, &mut a.q, q_a_norm, (wb, None), (n, r, h * m.qk()));
        }
        _ => linear(b, ctx.precision, &mut a.q, xn, (w.q.expect("q_proj"), None), (n, d, h * m.qk())),
    }
    b.rope_forward(&mut a.q, ctx.rope_table, ctx.positions, m.q_rope());

    linear(b, ctx.precision, &mut a.kv_a, xn, (w.kv_a, w.kv_a_bias), (n, d, m.kv_a()));
    b.copy_columns(&mut a.c, &a.kv_a, m.columns(n, m.c, (m.kv_a(), 0), (m.c, 0), false));
    b.rmsnorm_forward(&mut a.c_norm, &mut a.c_rstd, &a.c, w.kv_a_norm, LATENT_NORM_EPS);
    b.rope_forward(&mut a.kv_a, ctx.rope_table, ctx.positions, m.k_rope());

    match (kv, &ctx.cache) {
        (Some((kc, vc)), Some(cache)) if cache.latent => {
            // The latent rows: [c' ; k_pe] as keys (written over kv_a's c, which a forward with
            // a cache, never followed by a backward, does not read again) and c' as values.
            b.copy_columns(&mut a.kv_a, &a.c_norm, m.columns(n, m.c, (m.c, 0), (m.kv_a(), 0), false));
            cache.write(b, kc, &a.kv_a, m.kv_a());
            cache.write(b, vc, &a.c_norm, m.c);
            match cache.decode {
                Some((starts, lengths, spec)) => {
                    let scratch = a.absorbed.get_or_insert_with(|| AbsorbedScratch::new(b, &m));
                    let cache = (&*kc, &*vc, starts, lengths, spec);
                    absorbed_decode(b, &m, w, (&a.q, &mut a.att), scratch, cache, ctx.precision);
                }
                None => {
                    expand_keys_values(b, &m, w, a, ctx.precision);
                    b.attention_forward(&mut a.att, &mut a.lse, &a.q, &a.k, &a.v, ctx.segments, ctx.spec);
                }
            }
        }
        (kv, _) => {
            expand_keys_values(b, &m, w, a, ctx.precision);
            attend(b, (&mut a.att, &mut a.lse), &a.q, (&a.k, &a.v), (h * m.qk(), h * m.v), kv, ctx);
        }
    }
    linear(b, ctx.precision, out, &a.att, (w.o, w.o_bias), (n, h * m.v, d));
}

/// Per head `[k_nope ; v] = W_kvb · c'`, then `k = [k_nope ; k_pe]` and `v` split off: the
/// expanded keys and values attention over the batch reads (an absorbed decode needs none).
fn expand_keys_values<B: Backend>(b: &B, m: &Dims, w: &MlaWeights<&B::Slice>, a: &mut MlaActs<B>, p: Precision) {
    let (n, h) = (m.n, m.h);
    linear(b, p, &mut a.kv, &a.c_norm, (w.kv_b, None), (n, m.c, h * m.kv()));
    b.copy_columns(&mut a.k, &a.kv, m.columns(n * h, m.nope, (m.kv(), 0), (m.qk(), 0), false));
    for head in 0..h {
        let spec = m.columns(n, m.rope, (m.kv_a(), m.c), (h * m.qk(), head * m.qk() + m.nope), false);
        b.copy_columns(&mut a.k, &a.kv_a, spec);
    }
    b.copy_columns(&mut a.v, &a.kv, m.columns(n * h, m.v, (m.kv(), m.nope), (m.v, 0), false));
}

/// Decode attention over the latent cache, the up-projections absorbed: with W_UK and W_UV
/// a head's rows of `kv_b` (k_nope = W_UK·c', v = W_UV·c'),
///   q_nope·k_nope = (W_UKᵀ·q_nope)·c'    and    Σ_j p_j v_j = W_UV·(Σ_j p_j c'_j),
/// so each head's query becomes `[W_UKᵀ·q_nope ; q_pe]` against the cached `[c' ; k_pe]`
/// (one key head shared by all), its output `W_UV · (attention over c')`.
fn absorbed_decode<B: Backend>(
    b: &B,
    m: &Dims,
    w: &MlaWeights<&B::Slice>,
    (q, att): (&B::Slice, &mut B::Slice),
    s: &mut AbsorbedScratch<B>,
    (kc, vc, starts, lengths, spec): (&B::Slice, &B::Slice, &B::Index, &B::Index, DecodeAttention),
    precision: Precision,
) {
    let (n, h, lat) = (m.n, m.h, m.kv_a());
    let product = |rows: usize, cols: usize, inner: usize, trans_b: bool| Matmul {
        m: rows,
        n: cols,
        k: inner,
        trans_a: false,
        trans_b,
        batch: 1,
        accumulate: false,
        precision,
        b_is_weight: true,
    };
    // W_UK and W_UV of `head`: rows of kv_b, each c wide.
    let w_uk = |head: usize| b.slice(w.kv_b, head * m.kv() * m.c..(head * m.kv() + m.nope) * m.c);
    let w_uv = |head: usize| b.slice(w.kv_b, (head * m.kv() + m.nope) * m.c..(head + 1) * m.kv() * m.c);
    for head in 0..h {
        b.copy_columns(&mut s.q_head, q, ColumnCopy::take_block(n, m.nope, (h * m.qk(), head * m.qk())));
        b.matmul(&mut s.q_absorbed, &s.q_head, w_uk(head), product(n, m.c, m.nope, false));
        b.copy_columns(&mut s.q_latent, &s.q_absorbed, ColumnCopy::put_block(n, m.c, (h * lat, head * lat)));
        let q_pe = m.columns(n, m.rope, (h * m.qk(), head * m.qk() + m.nope), (h * lat, head * lat + m.c), false);
        b.copy_columns(&mut s.q_latent, q, q_pe);
    }
    b.attention_decode(&mut s.att_latent, &s.q_latent, kc, vc, starts, lengths, spec);
    for head in 0..h {
        b.copy_columns(&mut s.o_latent, &s.att_latent, ColumnCopy::take_block(n, m.c, (h * m.c, head * m.c)));
        b.matmul(&mut s.o_head, &s.o_latent, w_uv(head), product(n, m.v, m.c, true));
        b.copy_columns(att, &s.o_head, ColumnCopy::put_block(n, m.v, (h * m.v, head * m.v)));
    }
}

/// Backward of `forward`: overwrites `dxn` with dL/dxn and adds parameter gradients into `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    b: &B,
    cfg: &Config,
    w: &MlaWeights<&B::Slice>,
    xn: &B::Slice,
    dout: &B::Slice,
    dxn: &mut B::Slice,
    g: &mut MlaWeights<&mut B::Slice>,
    a: &MlaActs<B>,
    s: &mut MlaGrads<B>,
    ctx: &AttnCtx<B>,
    tp: Option<&TensorParallel<B>>,
) {
    let m = dims(cfg, ctx.tokens);
    let (n, d, h) = (m.n, m.d, m.h);
    let sum_over_heads = |buf: &mut B::Slice, what: &str| {
        if let Some(tp) = tp {
            tp.sum(buf, &format!("latent attention: {what}"));
        }
    };
    let whole_terms = tp.is_none_or(|tp| tp.adds_whole_terms());
    linear_backward(
        b,
        ctx.precision,
        Some((&mut s.datt, false)),
        (&mut g.o, g.o_bias.as_deref_mut()),
        dout,
        &a.att,
        w.o,
        (n, h * m.v, d),
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

    // [dk_nope ; dv] per head, and dk_pe summed over heads into [dc ; dk_pe].
    b.copy_columns(&mut s.dkv, &s.dk, m.columns(n * h, m.nope, (m.qk(), 0), (m.kv(), 0), false));
    b.copy_columns(&mut s.dkv, &s.dv, m.columns(n * h, m.v, (m.v, 0), (m.kv(), m.nope), false));
    b.fill(&mut s.dkv_a, 0.0);
    for head in 0..h {
        let spec = m.columns(n, m.rope, (h * m.qk(), head * m.qk() + m.nope), (m.kv_a(), m.c), true);
        b.copy_columns(&mut s.dkv_a, &s.dk, spec);
    }
    b.rope_backward(&mut s.dkv_a, ctx.rope_table, ctx.positions, m.k_rope());
    sum_over_heads(&mut s.dkv_a, "k_pe gradient");
    linear_backward(
        b,
        ctx.precision,
        Some((&mut s.dc_norm, false)),
        (&mut g.kv_b, None),
        &s.dkv,
        &a.c_norm,
        w.kv_b,
        (n, m.c, h * m.kv()),
    );
    sum_over_heads(&mut s.dc_norm, "latent c gradient");
    b.fill(&mut s.dc, 0.0);
    b.rmsnorm_backward(&mut s.dc, g.kv_a_norm, &s.dc_norm, &a.c, w.kv_a_norm, &a.c_rstd);
    b.copy_columns(&mut s.dkv_a, &s.dc, m.columns(n, m.c, (m.c, 0), (m.kv_a(), 0), false));
    if !whole_terms {
        b.fill(dxn, 0.0);
    }
    linear_backward(
        b,
        ctx.precision,
        whole_terms.then_some((&mut *dxn, false)),
        (&mut g.kv_a, g.kv_a_bias.as_deref_mut()),
        &s.dkv_a,
        xn,
        w.kv_a,
        (n, d, m.kv_a()),
    );

    b.rope_backward(&mut s.dq, ctx.rope_table, ctx.positions, m.q_rope());
    match (&a.q_a, &mut s.dq_a, &w.q_b, &mut g.q_b, &w.q_a_norm, &mut g.q_a_norm, &w.q_a, &mut g.q_a, m.q_rank) {
        (
            Some((q_a, q_a_norm, q_a_rstd)),
            Some((dq_a_norm, dq_a)),
            Some(wb),
            Some(gb),
            Some(wn),
            Some(gn),
            Some(wa),
            Some(ga),
            Some(r),
        ) => {
            linear_backward(
                b,
                ctx.precision,
                Some((&mut *dq_a_norm, false)),
                (gb, None),
                &s.dq,
                q_a_norm,
                wb,
                (n, r, h * m.qk()),
            );
            sum_over_heads(dq_a_norm, "latent query gradient");
            b.fill(dq_a, 0.0);
            b.rmsnorm_backward(dq_a, gn, dq_a_norm, q_a, wn, q_a_rstd);
            linear_backward(
                b,
                ctx.precision,
                whole_terms.then_some((dxn, true)),
                (ga, g.q_a_bias.as_deref_mut()),
                dq_a,
                xn,
                wa,
                (n, d, r),
            );
        }
        _ => {
            let (wq, gq) = (w.q.expect("q_proj"), g.q.as_deref_mut().expect("q_proj grad"));
            linear_backward(b, ctx.precision, Some((dxn, true)), (gq, None), &s.dq, xn, wq, (n, d, h * m.qk()));
        }
    }
}

//! DeepSeek-V4's compressed attention (transformers' `DeepseekV4HCACompressor`,
//! `DeepseekV4CSACompressor` and `DeepseekV4Indexer`): besides its sliding window, each query
//! of a CSA or HCA layer attends compressed entries, each summarising `rate` tokens:
//!
//!   C = RoPE(RMSNorm(pool(x·W_kvᵀ, x·W_gateᵀ, ape)))   at the windows' positions
//!   HCA: every complete window the query has passed;
//!   CSA: overlapping windows, and only the `index_topk` that the lightning indexer scores best
//!        (Σ_h w_h·relu(q_h·K), with q = RoPE(q_res·W_iqᵀ), K its own pooled entries, w = x·W_wᵀ)
//!   a = Attention(q, [window keys ; chosen C]) — the two attentions merged by their
//!       log-sum-exps before the sinks join.
//!
//! Backward: the chosen entries' attention gradient flows back through the rope, norm and
//! pooling to the compressor's weights; the indexer only chooses, so (as under autograd) its
//! weights get no gradient.

use super::{linear, linear_backward, AttnCtx};
use crate::compress_plan::CompressPlan;
use crate::config::Config;
use crate::config_v4::V4Config;
use crate::weights::V4AttnWeights;
use kiln_core::{Backend, Heads, Indexer, Pooling, Rope, SparseAttention};

/// The compressed layers' widths, for buffers shared by all of them.
fn sizes(v4: &V4Config, n: usize) -> Option<(usize, usize)> {
    let kinds = v4.compressions();
    let most_entries = kinds.iter().map(|k| n / k.rate).max()?;
    Some((most_entries, kinds.iter().map(|k| k.series()).max()?))
}

/// What the compressed part of a layer's forward keeps.
pub struct CompressedActs<B: Backend> {
    pub(super) kv: B::Buf,
    pub(super) gate: B::Buf,
    pooled: B::Buf,
    rstd: B::Buf,
    /// The entries: normalised and rotated.
    pub(super) entries: B::Buf,
    pub(super) att: B::Buf,
    pub(super) lse: B::Buf,
    /// Each query's chosen entries (CSA), `[tokens, top_k]`.
    pub(super) chosen: B::Index,
    pub(super) indexer: Option<IndexerActs<B>>,
}

/// The lightning indexer's work (nothing of it is kept for backward).
pub(super) struct IndexerActs<B: Backend> {
    pub(super) kv: B::Buf,
    pub(super) gate: B::Buf,
    pooled: B::Buf,
    rstd: B::Buf,
    pub(super) keys: B::Buf,
    pub(super) q: B::Buf,
    pub(super) weights: B::Buf,
}

/// Gradient scratch of the compressed part.
pub struct CompressedGrads<B: Backend> {
    dq: B::Buf,
    dentries: B::Buf,
    dpooled: B::Buf,
    dkv: B::Buf,
    dgate: B::Buf,
}

impl<B: Backend> CompressedActs<B> {
    /// Buffers for every compressed layer of `c` over `n` tokens; `None` without any.
    pub fn new(b: &B, c: &Config, v4: &V4Config, n: usize) -> Option<Self> {
        let (most, series) = sizes(v4, n)?;
        let (hd, h) = (c.head_dim, c.num_heads);
        let sparse = series == 2;
        let (ihd, ih) = (v4.index_head_dim, v4.index_heads);
        Some(Self {
            kv: b.zeros(n * series * hd),
            gate: b.zeros(n * series * hd),
            pooled: b.zeros(most * hd),
            rstd: b.zeros(most),
            entries: b.zeros(most * hd),
            att: b.zeros(n * h * hd),
            lse: b.zeros(n * h),
            chosen: b.upload_index(&vec![-1; if sparse { n * v4.index_topk } else { 0 }]),
            indexer: sparse.then(|| IndexerActs {
                kv: b.zeros(n * 2 * ihd),
                gate: b.zeros(n * 2 * ihd),
                pooled: b.zeros(most * ihd),
                rstd: b.zeros(most),
                keys: b.zeros(most * ihd),
                q: b.zeros(n * ih * ihd),
                weights: b.zeros(n * ih),
            }),
        })
    }
}

impl<B: Backend> CompressedGrads<B> {
    /// The gradient of the first `values` values of the entries (after `backward_attention`).
    pub(super) fn entries_gradient(&mut self, b: &B, values: usize) -> &mut B::Slice {
        b.slice_mut(&mut self.dentries, 0..values)
    }

    pub fn new(b: &B, c: &Config, v4: &V4Config, n: usize) -> Option<Self> {
        let (most, series) = sizes(v4, n)?;
        let hd = c.head_dim;
        Some(Self {
            dq: b.zeros(n * c.num_heads * hd),
            dentries: b.zeros(most * hd),
            dpooled: b.zeros(most * hd),
            dkv: b.zeros(n * series * hd),
            dgate: b.zeros(n * series * hd),
        })
    }
}

/// Rope of `heads` heads of `head_dim` over `tokens` rows: the last `rot` features, pairwise.
fn rope(tokens: usize, heads: usize, head_dim: usize, rot: usize) -> Rope {
    Rope { x: Heads { tokens, heads, head_dim }, rot_dim: rot, offset: head_dim - rot, interleaved: true }
}

/// What the layer's queries attend and how many per query: CSA the indexer's `index_topk`
/// choices (−1 past the visible), HCA every visible entry.
fn choice<'a, B: Backend>(chosen: &'a B::Index, plan: &'a CompressPlan<B>, v4: &V4Config) -> (&'a B::Index, usize) {
    if plan.overlap {
        (chosen, v4.index_topk)
    } else {
        (&plan.all_visible, plan.most_visible)
    }
}

fn sparse_spec(c: &Config, ctx: &AttnCtx<impl Backend>, entries: usize, top_k: usize) -> SparseAttention {
    SparseAttention {
        batch: ctx.spec.batch,
        seq: ctx.spec.seq,
        q_heads: c.num_heads,
        head_dim: c.head_dim,
        entries,
        top_k,
        scale: ctx.spec.scale,
    }
}

/// Attends the layer's compressed entries with `q` (rotated) and merges that into the sliding
/// attention's `att` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &B,
    c: &Config,
    v4: &V4Config,
    w: &V4AttnWeights<&B::Slice>,
    (xn, q_res, q): (&B::Slice, &B::Slice, &B::Slice),
    (att, lse): (&mut B::Slice, &mut B::Slice),
    a: &mut CompressedActs<B>,
    ctx: &AttnCtx<B>,
    plan: &CompressPlan<B>,
) {
    let (n, d, hd, rot, p) = (ctx.tokens, c.hidden_size, c.head_dim, c.rot_dim, ctx.precision);
    let (e, width) = (plan.entries, plan.pooling(hd).series() * hd);
    let (kv_w, gate_w, ape, norm) = (
        w.comp_kv.expect("compressor kv"),
        w.comp_gate.expect("compressor gate"),
        w.comp_ape.expect("compressor ape"),
        w.comp_norm.expect("compressor norm"),
    );
    let (kv, gate) = (b.slice_mut(&mut a.kv, 0..n * width), b.slice_mut(&mut a.gate, 0..n * width));
    linear(b, p, kv, xn, (kv_w, None), (n, d, width));
    linear(b, p, gate, xn, (gate_w, None), (n, d, width));
    pool_entries(
        b,
        (&mut a.pooled, &mut a.rstd, &mut a.entries),
        (b.slice(&a.kv, 0..n * width), b.slice(&a.gate, 0..n * width)),
        (ape, norm),
        (&plan.slots, &plan.positions),
        plan.pooling(hd),
        (ctx.rope_table, rot, c.rms_norm_eps),
    );

    if plan.overlap {
        let ix = a.indexer.as_mut().expect("indexer buffers");
        let ihd = v4.index_head_dim;
        let (ikv, igate) = (b.slice_mut(&mut ix.kv, 0..n * 2 * ihd), b.slice_mut(&mut ix.gate, 0..n * 2 * ihd));
        linear(b, p, ikv, xn, (w.index_kv.expect("indexer kv"), None), (n, d, 2 * ihd));
        linear(b, p, igate, xn, (w.index_gate.expect("indexer gate"), None), (n, d, 2 * ihd));
        pool_entries(
            b,
            (&mut ix.pooled, &mut ix.rstd, &mut ix.keys),
            (&ix.kv, &ix.gate),
            (w.index_ape.expect("indexer ape"), w.index_norm.expect("indexer norm")),
            (&plan.slots, &plan.positions),
            plan.pooling(ihd),
            (ctx.rope_table, rot, c.rms_norm_eps),
        );
        indexer_queries(b, c, v4, w, (xn, q_res), ix, ctx);
        let spec = indexer_spec(v4, n, e);
        b.indexer_topk(&mut a.chosen, &ix.q, b.slice(&ix.keys, 0..e * ihd), &ix.weights, &plan.visible, spec);
    }
    let (chosen, k) = choice(&a.chosen, plan, v4);
    let spec = sparse_spec(c, ctx, e, k);
    b.sparse_attention_forward(&mut a.att, &mut a.lse, q, b.slice(&a.entries, 0..e * hd), chosen, spec);
    b.attention_merge(att, lse, &a.att, &a.lse, ctx.spec);
}

/// `out` = RoPE(RMSNorm(pool(kv, gate))) of the `pooling.entries` windows `slots`, at
/// `positions` (prefixes of the three buffers; `pooled` and `rstd` are what backward reads).
#[allow(clippy::too_many_arguments)]
pub(super) fn pool_entries<B: Backend>(
    b: &B,
    (pooled, rstd, out): (&mut B::Slice, &mut B::Slice, &mut B::Slice),
    (kv, gate): (&B::Slice, &B::Slice),
    (ape, norm): (&B::Slice, &B::Slice),
    (slots, positions): (&B::Index, &B::Index),
    pooling: Pooling,
    (rope_table, rot, eps): (&B::Slice, usize, f32),
) {
    let (e, width) = (pooling.entries, pooling.width);
    let (pooled, rstd, out) =
        (b.slice_mut(pooled, 0..e * width), b.slice_mut(rstd, 0..e), b.slice_mut(out, 0..e * width));
    b.pool_forward(pooled, kv, gate, ape, slots, pooling);
    b.rmsnorm_forward(out, rstd, pooled, norm, eps);
    b.rope_forward(out, rope_table, positions, rope(e, 1, width, rot));
}

/// The indexer's rotated queries (`ix.q`, from the low-rank query `q_res`) and per-head
/// weights (`ix.weights`) of the context's tokens.
pub(super) fn indexer_queries<B: Backend>(
    b: &B,
    c: &Config,
    v4: &V4Config,
    w: &V4AttnWeights<&B::Slice>,
    (xn, q_res): (&B::Slice, &B::Slice),
    ix: &mut IndexerActs<B>,
    ctx: &AttnCtx<B>,
) {
    let (n, d, p) = (ctx.tokens, c.hidden_size, ctx.precision);
    let (ihd, ih) = (v4.index_head_dim, v4.index_heads);
    linear(b, p, &mut ix.q, q_res, (w.index_q_b.expect("indexer q"), None), (n, v4.q_lora_rank, ih * ihd));
    b.rope_forward(&mut ix.q, ctx.rope_table, ctx.positions, rope(n, ih, ihd, c.rot_dim));
    linear(b, p, &mut ix.weights, xn, (w.index_weights.expect("indexer weights"), None), (n, d, ih));
}

/// The indexer's choice for `tokens` queries among `entries` keys.
pub(super) fn indexer_spec(v4: &V4Config, tokens: usize, entries: usize) -> Indexer {
    let (ihd, ih) = (v4.index_head_dim, v4.index_heads);
    Indexer { tokens, heads: ih, head_dim: ihd, entries, top_k: v4.index_topk, scale: ((ihd * ih) as f32).powf(-0.5) }
}

/// Backward of `forward`'s attention, given the merged `att` and `lse` and their gradient
/// `datt`: adds the queries' gradient into `dq` and keeps the entries' for
/// `backward_compressor`.
#[allow(clippy::too_many_arguments)]
pub fn backward_attention<B: Backend>(
    b: &B,
    c: &Config,
    v4: &V4Config,
    (q, datt, att, lse): (&B::Slice, &B::Slice, &B::Slice, &B::Slice),
    dq: &mut B::Slice,
    a: &CompressedActs<B>,
    s: &mut CompressedGrads<B>,
    ctx: &AttnCtx<B>,
    plan: &CompressPlan<B>,
) {
    let (e, hd) = (plan.entries, c.head_dim);
    let (chosen, k) = choice(&a.chosen, plan, v4);
    let entries = b.slice(&a.entries, 0..e * hd);
    let dentries = b.slice_mut(&mut s.dentries, 0..e * hd);
    b.sparse_attention_backward(&mut s.dq, dentries, datt, q, entries, chosen, att, lse, sparse_spec(c, ctx, e, k));
    b.add_assign(dq, &s.dq);
}

/// The rest of the backward: from the entries' gradient through the rope, norm and pooling to
/// the compressor's weights (into `g`) and the input (added into `dxn`).
#[allow(clippy::too_many_arguments)]
pub fn backward_compressor<B: Backend>(
    b: &B,
    c: &Config,
    w: &V4AttnWeights<&B::Slice>,
    g: &mut V4AttnWeights<&mut B::Slice>,
    xn: &B::Slice,
    dxn: &mut B::Slice,
    a: &CompressedActs<B>,
    s: &mut CompressedGrads<B>,
    ctx: &AttnCtx<B>,
    plan: &CompressPlan<B>,
) {
    let (n, d, hd, rot, p) = (ctx.tokens, c.hidden_size, c.head_dim, c.rot_dim, ctx.precision);
    let (e, width) = (plan.entries, plan.pooling(hd).series() * hd);
    b.rope_backward(b.slice_mut(&mut s.dentries, 0..e * hd), ctx.rope_table, &plan.positions, rope(e, 1, hd, rot));
    let dpooled = b.slice_mut(&mut s.dpooled, 0..e * hd);
    b.fill(dpooled, 0.0);
    let norm = (w.comp_norm.expect("compressor norm"), g.comp_norm.as_deref_mut().expect("compressor norm grad"));
    let (pooled, rstd) = (b.slice(&a.pooled, 0..e * hd), b.slice(&a.rstd, 0..e));
    b.rmsnorm_backward(dpooled, norm.1, b.slice(&s.dentries, 0..e * hd), pooled, norm.0, rstd);
    let (dkv, dgate) = (b.slice_mut(&mut s.dkv, 0..n * width), b.slice_mut(&mut s.dgate, 0..n * width));
    let (kv, gate) = (b.slice(&a.kv, 0..n * width), b.slice(&a.gate, 0..n * width));
    let (ape, dape) = (w.comp_ape.expect("compressor ape"), g.comp_ape.as_deref_mut().expect("compressor ape grad"));
    b.pool_backward(dkv, dgate, dape, b.slice(&s.dpooled, 0..e * hd), kv, gate, ape, &plan.slots, plan.pooling(hd));
    let (kv_w, gate_w) = (w.comp_kv.expect("compressor kv"), w.comp_gate.expect("compressor gate"));
    let dkv_w = g.comp_kv.as_deref_mut().expect("compressor kv grad");
    linear_backward(
        b,
        p,
        Some((&mut *dxn, true)),
        (dkv_w, None),
        b.slice(&s.dkv, 0..n * width),
        xn,
        kv_w,
        (n, d, width),
    );
    let dgate_w = g.comp_gate.as_deref_mut().expect("compressor gate grad");
    linear_backward(
        b,
        p,
        Some((dxn, true)),
        (dgate_w, None),
        b.slice(&s.dgate, 0..n * width),
        xn,
        gate_w,
        (n, d, width),
    );
}

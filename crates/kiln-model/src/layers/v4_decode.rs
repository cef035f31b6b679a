//! DeepSeek-V4's attention with its generation caches (`crate::v4_cache`). A prefill runs the
//! training forward over the prompts, then `store_prefill` keeps what later tokens read: the
//! window's keys, the compressor's (and indexer's) projected rows still to be pooled, and the
//! pooled entries. A decode step (`attend`), for each new token q at position p:
//!
//!   kv(p) into the window ring;  a_w, lse_w = Attention(q, kv(p − window + 1 ..= p))
//!   compressed layers: the compressor's rows of p into their ring; when p + 1 = (w + 1)·m,
//!     entry w = RoPE(RMSNorm(pool(window w (and, CSA, w − 1)))) at position w·m into the cache
//!     a_c, lse_c = Attention(q, entries w < (p + 1)/m)   (CSA: the indexer's top k of them)
//!     a, lse = merge(a_w, a_c)
//!
//! exactly what the training forward computes for the token at p (the sinks then join as there).

use super::v4_compressed::{indexer_queries, indexer_spec, pool_entries, CompressedActs};
use super::{linear, AttnCtx};
use crate::config::Config;
use crate::config_v4::{Compression, V4Config};
use crate::v4_cache::{LayerStep, V4LayerCache};
use crate::weights::V4AttnWeights;
use kiln_core::{Backend, Pooling, Precision, SparseAttention};

/// Stores a prefill's rows in the layer's caches: `kv` the tokens' rotated keys, `ca` the
/// compressed part's activations (pooled entries in `CompressPlan` order).
pub fn store_prefill<B: Backend>(
    b: &B,
    c: &Config,
    v4: &V4Config,
    kv: &B::Slice,
    ca: Option<&CompressedActs<B>>,
    (cache, step): (&mut V4LayerCache<B>, &LayerStep<B>),
    n: usize,
) {
    let hd = c.head_dim;
    b.scatter_rows(&mut cache.kv, kv, step.kv_rows, hd, Precision::F32);
    let (Some(cc), Some(cs)) = (cache.compressed.as_mut(), step.compress) else { return };
    let ca = ca.expect("compressed attention activations");
    let (width, e) = (cs.compression.series() * hd, cs.entries);
    b.scatter_rows(&mut cc.raw_kv, b.slice(&ca.kv, 0..n * width), &cs.raw_rows, width, Precision::F32);
    b.scatter_rows(&mut cc.raw_gate, b.slice(&ca.gate, 0..n * width), &cs.raw_rows, width, Precision::F32);
    b.scatter_rows(&mut cc.entries, b.slice(&ca.entries, 0..e * hd), &cs.entry_rows, hd, Precision::F32);
    if let (Some((raw_kv, raw_gate, keys)), Some(ix)) = (cc.indexer.as_mut(), ca.indexer.as_ref()) {
        let ihd = v4.index_head_dim;
        b.scatter_rows(raw_kv, b.slice(&ix.kv, 0..n * 2 * ihd), &cs.raw_rows, 2 * ihd, Precision::F32);
        b.scatter_rows(raw_gate, b.slice(&ix.gate, 0..n * 2 * ihd), &cs.raw_rows, 2 * ihd, Precision::F32);
        b.scatter_rows(keys, b.slice(&ix.keys, 0..e * ihd), &cs.entry_rows, ihd, Precision::F32);
    }
}

/// One decode step's attention (see the module's formulas) into `att` and `lse`, from the
/// tokens' normalised input `xn`, low-rank query `q_res`, rotated queries `q` and keys `kv`.
#[allow(clippy::too_many_arguments)]
pub fn attend<B: Backend>(
    b: &B,
    c: &Config,
    v4: &V4Config,
    w: &V4AttnWeights<&B::Slice>,
    (xn, q_res, q, kv): (&B::Slice, &B::Slice, &B::Slice, &B::Slice),
    (att, lse): (&mut B::Slice, &mut B::Slice),
    ca: Option<&mut CompressedActs<B>>,
    (cache, step): (&mut V4LayerCache<B>, &LayerStep<B>),
    ctx: &AttnCtx<B>,
) {
    let (n, d, hd, p) = (ctx.tokens, c.hidden_size, c.head_dim, ctx.precision);
    b.scatter_rows(&mut cache.kv, kv, step.kv_rows, hd, Precision::F32);
    let (window, table, ring) = step.window.expect("a decode step has windows");
    let attention = |entries, top_k| SparseAttention {
        batch: n,
        seq: 1,
        q_heads: c.num_heads,
        head_dim: hd,
        entries,
        top_k,
        scale: ctx.spec.scale,
    };
    b.sparse_attention_forward(att, lse, q, &cache.kv, window, attention(table, ring));
    let (Some(cc), Some(cs)) = (cache.compressed.as_mut(), step.compress) else { return };
    let ca = ca.expect("compressed attention buffers");
    let eps = c.rms_norm_eps;

    // The compressor's rows of the new tokens, and the entries they complete.
    let width = cs.compression.series() * hd;
    let (kv_w, gate_w) = (w.comp_kv.expect("compressor kv"), w.comp_gate.expect("compressor gate"));
    linear(b, p, b.slice_mut(&mut ca.kv, 0..n * width), xn, (kv_w, None), (n, d, width));
    linear(b, p, b.slice_mut(&mut ca.gate, 0..n * width), xn, (gate_w, None), (n, d, width));
    b.scatter_rows(&mut cc.raw_kv, b.slice(&ca.kv, 0..n * width), &cs.raw_rows, width, Precision::F32);
    b.scatter_rows(&mut cc.raw_gate, b.slice(&ca.gate, 0..n * width), &cs.raw_rows, width, Precision::F32);
    let norms = (w.comp_ape.expect("compressor ape"), w.comp_norm.expect("compressor norm"));
    let rope = (ctx.rope_table, c.rot_dim, eps);
    complete_entries(b, (&cc.raw_kv, &cc.raw_gate), norms, &mut cc.entries, cs, hd, rope);

    let (chosen, top_k) = match (cc.indexer.as_mut(), ca.indexer.as_mut()) {
        (Some((raw_kv, raw_gate, keys)), Some(ix)) => {
            let ihd = v4.index_head_dim;
            let (ikv, igate) = (b.slice_mut(&mut ix.kv, 0..n * 2 * ihd), b.slice_mut(&mut ix.gate, 0..n * 2 * ihd));
            linear(b, p, ikv, xn, (w.index_kv.expect("indexer kv"), None), (n, d, 2 * ihd));
            linear(b, p, igate, xn, (w.index_gate.expect("indexer gate"), None), (n, d, 2 * ihd));
            b.scatter_rows(raw_kv, b.slice(&ix.kv, 0..n * 2 * ihd), &cs.raw_rows, 2 * ihd, Precision::F32);
            b.scatter_rows(raw_gate, b.slice(&ix.gate, 0..n * 2 * ihd), &cs.raw_rows, 2 * ihd, Precision::F32);
            let norms = (w.index_ape.expect("indexer ape"), w.index_norm.expect("indexer norm"));
            complete_entries(b, (raw_kv, raw_gate), norms, keys, cs, ihd, rope);
            indexer_queries(b, c, v4, w, (xn, q_res), ix, ctx);
            let spec = indexer_spec(v4, n, cs.table);
            b.indexer_topk(&mut ca.chosen, &ix.q, keys, &ix.weights, &cs.visible, spec);
            (&ca.chosen, v4.index_topk)
        }
        _ => (&cs.all_visible, cs.most_visible),
    };
    b.sparse_attention_forward(&mut ca.att, &mut ca.lse, q, &cc.entries, chosen, attention(cs.table, top_k));
    b.attention_merge(att, lse, &ca.att, &ca.lse, ctx.spec);
}

/// Pools the entries this step completes (`cs.windows` of the raw rows) into their cache rows
/// of `entries` (rows of `width`).
fn complete_entries<B: Backend>(
    b: &B,
    (raw_kv, raw_gate): (&B::Slice, &B::Slice),
    (ape, norm): (&B::Slice, &B::Slice),
    entries: &mut B::Slice,
    cs: &crate::v4_cache::CompressStep<B>,
    width: usize,
    rope: (&B::Slice, usize, f32),
) {
    let e = cs.entries;
    if e == 0 {
        return;
    }
    let (mut pooled, mut rstd, mut out) = (b.zeros(e * width), b.zeros(e), b.zeros(e * width));
    let Compression { rate, overlap } = cs.compression;
    let pooling = Pooling { entries: e, rate, width, overlap };
    let at = (&cs.windows, &cs.positions);
    pool_entries(b, (&mut pooled, &mut rstd, &mut out), (raw_kv, raw_gate), (ape, norm), at, pooling, rope);
    b.scatter_rows(entries, &out, &cs.entry_rows, width, Precision::F32);
}

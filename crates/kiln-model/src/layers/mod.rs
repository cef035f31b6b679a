//! The blocks a decoder layer is made of, each with its forward, its backward, and the
//! activations and gradient scratch it needs: attention (grouped-query or multi-head latent)
//! and feed-forward (dense SwiGLU or DeepSeekMoE).

pub mod expert_parallel;
pub mod gqa;
pub mod hyper;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod moe_aux_loss;
pub mod v4_attention;
pub mod v4_compressed;
pub mod v4_decode;

use kiln_core::{Attention, Backend, DecodeAttention, Matmul, Precision};

/// What an attention block reads besides its input: the batch's positions and segments, and
/// for generation where its keys and values go in the cache.
pub struct AttnCtx<'a, B: Backend> {
    pub tokens: usize,
    pub rope_table: &'a B::Slice,
    pub positions: &'a B::Index,
    pub segments: &'a B::Index,
    pub spec: Attention,
    pub cache: Option<CacheCtx<'a, B>>,
    /// DeepSeek-V4's compressed layers: where the batch's compressed entries come from.
    pub compressed: Option<&'a crate::compress_plan::CompressPlan<B>>,
    /// Inputs of the layer's matrix products.
    pub precision: Precision,
}

/// Cache rows of the batch's tokens and, when decoding, the rows each new token attends
/// (`starts`, `lengths`) with the decode attention.
pub struct CacheCtx<'a, B: Backend> {
    pub rows: &'a B::Index,
    /// Multi-head latent attention caches its latent rows (see `kv_cache`).
    pub latent: bool,
    /// How the cache stores keys and values.
    pub storage: Precision,
    pub decode: Option<(&'a B::Index, &'a B::Index, DecodeAttention)>,
}

impl<B: Backend> Clone for CacheCtx<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for CacheCtx<'_, B> {}

impl<B: Backend> CacheCtx<'_, B> {
    /// Writes the batch's rows of `src` (`width` wide) into `dst`, at their cache rows.
    pub(crate) fn write(&self, b: &B, dst: &mut B::Slice, src: &B::Slice, width: usize) {
        b.scatter_rows(dst, src, self.rows, width, self.storage);
    }
}

/// Attention of a block whose keys `k` and values `v` (rows of `k_row`, `v_row`) are ready:
/// over the batch, or, with a layer cache, after writing them into it, over the batch
/// (prefill) or over each sequence's cached rows (decode).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend<B: Backend>(
    b: &B,
    (att, lse): (&mut B::Slice, &mut B::Slice),
    q: &B::Slice,
    (k, v): (&B::Slice, &B::Slice),
    (k_row, v_row): (usize, usize),
    kv: Option<(&mut B::Slice, &mut B::Slice)>,
    ctx: &AttnCtx<B>,
) {
    if let (Some((kc, vc)), Some(cache)) = (kv, &ctx.cache) {
        cache.write(b, kc, k, k_row);
        cache.write(b, vc, v, v_row);
        if let Some((starts, lengths, spec)) = cache.decode {
            b.attention_decode(att, q, kc, vc, starts, lengths, spec);
            return;
        }
    }
    b.attention_forward(att, lse, q, k, v, ctx.segments, ctx.spec);
}

/// `y = x·Wᵀ (+ bias)` for `rows` rows.
pub(crate) fn linear<B: Backend>(
    b: &B,
    p: Precision,
    y: &mut B::Slice,
    x: &B::Slice,
    (w, bias): (&B::Slice, Option<&B::Slice>),
    (rows, d_in, d_out): (usize, usize, usize),
) {
    b.matmul(y, x, w, Matmul::linear(rows, d_in, d_out).in_precision(p).of_weight());
    if let Some(bias) = bias {
        b.add_bias(y, bias);
    }
}

/// Backward of `linear`: `dW += dyᵀ·x`, `dbias += Σ dy`, and `dx (+)= dy·W` when asked
/// (`(dx, accumulate)`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward<B: Backend>(
    b: &B,
    p: Precision,
    dx: Option<(&mut B::Slice, bool)>,
    (dw, dbias): (&mut B::Slice, Option<&mut B::Slice>),
    dy: &B::Slice,
    x: &B::Slice,
    w: &B::Slice,
    (rows, d_in, d_out): (usize, usize, usize),
) {
    b.matmul(dw, dy, x, Matmul::linear_dw(rows, d_in, d_out).in_precision(p));
    if let Some(db) = dbias {
        b.bias_backward(db, dy);
    }
    if let Some((dx, accumulate)) = dx {
        b.matmul(dx, dy, w, Matmul::linear_dx(rows, d_in, d_out, accumulate).in_precision(p));
    }
}

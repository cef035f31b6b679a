//! Manifold-constrained hyper-connections (DeepSeek-V4, transformers' `DeepseekV4HyperConnection`
//! and `DeepseekV4HyperHead`): the residual is `S` streams per token, `X` (`[n, S·d]`), and each
//! block reads and writes it through one of these.
//!
//!   Y = X / rms(X)                          (unweighted RMSNorm over all S·d features)
//!   m = Y·Fᵀ;  (pre, post, comb) = hc_weights(m, base, scale)     (`Backend::hc_weights_forward`)
//!   c_t = Σ_j pre_tj X_tj                   (collapse: the block's input)
//!   X'_tk = post_tk o_t + Σ_j comb_tjk X_tj (expand: o is the block's output)
//!
//! The head (before the final norm) only collapses, with its own `pre`. Backward, G = dL/dX':
//!   do_t = Σ_k post_tk G_tk;  dpost_tk = G_tk·o_t;  dcomb_tjk = X_tj·G_tk;  dX_tj = Σ_k comb_tjk G_tk
//!   dpre_tj = dc_t·X_tj;  dX_tj += pre_tj dc_t
//!   dm = hc_weights'(dpre, dpost, dcomb);  dF += dmᵀ·Y;  dY = dm·F;  dX += RMSNorm'(dY)
//!
//! Per token these are S×S, S×1 and 1×S products: batched matrix products over the tokens. All
//! of it runs in f32, as transformers keeps these modules in f32.

use super::{linear, linear_backward};
use crate::config_v4::HcConfig;
use crate::weights::HcWeights;
use kiln_core::{Backend, ColumnCopy, HyperConnection, Matmul, Precision};

/// A hyper-connection's sizes for `n` tokens of `d` features.
#[derive(Clone, Copy, Debug)]
pub struct HcDims {
    pub n: usize,
    pub d: usize,
    pub hc: HcConfig,
    /// The head's form: `pre` only.
    pub head: bool,
}

impl HcDims {
    fn streams(&self) -> usize {
        self.hc.streams
    }
    fn spec(&self) -> HyperConnection {
        HyperConnection {
            tokens: self.n,
            streams: self.hc.streams,
            iters: self.hc.sinkhorn_iters,
            eps: self.hc.eps,
            head: self.head,
        }
    }
    fn width(&self) -> usize {
        self.spec().width()
    }
    /// `cols` columns at `offset` of the `[n, width]` weights, out of them (`take`) or into them.
    fn part(&self, cols: usize, offset: usize, take: bool) -> ColumnCopy {
        let wide = (self.width(), offset);
        if take {
            ColumnCopy::take_block(self.n, cols, wide)
        } else {
            ColumnCopy::put_block(self.n, cols, wide)
        }
    }
    /// One token's `[m, k]·[k, cols]` product, for every token.
    fn per_token(&self, m: usize, k: usize, cols: usize) -> Matmul {
        Matmul {
            m,
            n: cols,
            k,
            trans_a: false,
            trans_b: false,
            batch: self.n,
            accumulate: false,
            precision: Precision::F32,
            b_is_weight: false,
        }
    }
}

/// What a hyper-connection's forward keeps.
pub struct HcActs<B: Backend> {
    dims: HcDims,
    normed: B::Buf,
    rstd: B::Buf,
    mixes: B::Buf,
    weights: B::Buf,
    pre: B::Buf,
    post: B::Buf,
    comb: B::Buf,
    /// The collapsed streams: the block's input.
    pub collapsed: B::Buf,
}

impl<B: Backend> HcActs<B> {
    pub fn new(b: &B, dims: HcDims) -> Self {
        let (n, s, d) = (dims.n, dims.streams(), dims.d);
        let hidden = if dims.head { 0 } else { n };
        Self {
            dims,
            normed: b.zeros(n * s * d),
            rstd: b.zeros(n),
            mixes: b.zeros(n * dims.width()),
            weights: b.zeros(n * dims.width()),
            pre: b.zeros(n * s),
            post: b.zeros(hidden * s),
            comb: b.zeros(hidden * s * s),
            collapsed: b.zeros(n * d),
        }
    }
}

/// Gradient scratch of the hyper-connections, shared by all of them.
pub struct HcGrads<B: Backend> {
    dweights: B::Buf,
    dmixes: B::Buf,
    dpre: B::Buf,
    dpost: B::Buf,
    dcomb: B::Buf,
    dnormed: B::Buf,
    /// The gradient of the norm's weight of ones, not wanted.
    dones: B::Buf,
}

impl<B: Backend> HcGrads<B> {
    pub fn new(b: &B, dims: HcDims) -> Self {
        let (n, s, d) = (dims.n, dims.streams(), dims.d);
        let w = (2 + s) * s;
        Self {
            dweights: b.zeros(n * w),
            dmixes: b.zeros(n * w),
            dpre: b.zeros(n * s),
            dpost: b.zeros(n * s),
            dcomb: b.zeros(n * s * s),
            dnormed: b.zeros(n * s * d),
            dones: b.zeros(s * d),
        }
    }
}

/// The mixing weights from the streams `x` and `a.collapsed` = Σ_j pre_j x_j. `ones` is `S·d`
/// ones (the unweighted norm's weight).
pub fn collapse<B: Backend>(
    b: &B,
    w: &HcWeights<&B::Slice>,
    x: &B::Slice,
    a: &mut HcActs<B>,
    ones: &B::Slice,
    eps: f32,
) {
    let dims = a.dims;
    let (n, s, d, width) = (dims.n, dims.streams(), dims.d, dims.width());
    b.rmsnorm_forward(&mut a.normed, &mut a.rstd, x, ones, eps);
    linear(b, Precision::F32, &mut a.mixes, &a.normed, (w.mix, None), (n, s * d, width));
    b.hc_weights_forward(&mut a.weights, &a.mixes, w.base, w.scale, dims.spec());
    b.copy_columns(&mut a.pre, &a.weights, dims.part(s, 0, true));
    if !dims.head {
        b.copy_columns(&mut a.post, &a.weights, dims.part(s, s, true));
        b.copy_columns(&mut a.comb, &a.weights, dims.part(s * s, 2 * s, true));
    }
    b.matmul(&mut a.collapsed, &a.pre, x, dims.per_token(1, s, d));
}

/// `x_out_k = post_k·block_out + Σ_j comb_jk x_j`.
pub fn expand<B: Backend>(b: &B, a: &HcActs<B>, x: &B::Slice, block_out: &B::Slice, x_out: &mut B::Slice) {
    let dims = a.dims;
    let (s, d) = (dims.streams(), dims.d);
    b.matmul(x_out, &a.comb, x, Matmul { trans_a: true, ..dims.per_token(s, s, d) });
    b.matmul(x_out, &a.post, block_out, Matmul { accumulate: true, ..dims.per_token(s, 1, d) });
}

/// Backward of `expand` from `dx_out`: overwrites `dblock_out` and `dx` (the streams' share
/// through `comb`), and keeps dpost and dcomb in `g` for `collapse_backward`.
#[allow(clippy::too_many_arguments)]
pub fn expand_backward<B: Backend>(
    b: &B,
    a: &HcActs<B>,
    x: &B::Slice,
    block_out: &B::Slice,
    dx_out: &B::Slice,
    dblock_out: &mut B::Slice,
    dx: &mut B::Slice,
    g: &mut HcGrads<B>,
) {
    let dims = a.dims;
    let (n, s, d) = (dims.n, dims.streams(), dims.d);
    b.matmul(dblock_out, &a.post, dx_out, dims.per_token(1, s, d));
    b.matmul(b.slice_mut(&mut g.dpost, 0..n * s), dx_out, block_out, dims.per_token(s, d, 1));
    b.matmul(b.slice_mut(&mut g.dcomb, 0..n * s * s), x, dx_out, Matmul { trans_b: true, ..dims.per_token(s, d, s) });
    b.matmul(dx, &a.comb, dx_out, dims.per_token(s, s, d));
}

/// Backward of `collapse` from `dcollapsed` (and, unless the head, `expand_backward`'s dpost and
/// dcomb in `g`): adds into `dx` and the weights' gradients `gw`.
#[allow(clippy::too_many_arguments)]
pub fn collapse_backward<B: Backend>(
    b: &B,
    w: &HcWeights<&B::Slice>,
    gw: &mut HcWeights<&mut B::Slice>,
    a: &HcActs<B>,
    x: &B::Slice,
    dcollapsed: &B::Slice,
    dx: &mut B::Slice,
    g: &mut HcGrads<B>,
    ones: &B::Slice,
) {
    let dims = a.dims;
    let (n, s, d, width) = (dims.n, dims.streams(), dims.d, dims.width());
    let dpre = b.slice_mut(&mut g.dpre, 0..n * s);
    b.matmul(dpre, x, dcollapsed, dims.per_token(s, d, 1));
    b.matmul(dx, &a.pre, dcollapsed, Matmul { accumulate: true, ..dims.per_token(s, 1, d) });

    let dweights = b.slice_mut(&mut g.dweights, 0..n * width);
    b.copy_columns(dweights, b.slice(&g.dpre, 0..n * s), dims.part(s, 0, false));
    if !dims.head {
        b.copy_columns(dweights, b.slice(&g.dpost, 0..n * s), dims.part(s, s, false));
        b.copy_columns(dweights, b.slice(&g.dcomb, 0..n * s * s), dims.part(s * s, 2 * s, false));
    }
    let dmixes = b.slice_mut(&mut g.dmixes, 0..n * width);
    let dweights = b.slice(&g.dweights, 0..n * width);
    b.hc_weights_backward(dmixes, gw.base, gw.scale, dweights, &a.mixes, w.base, w.scale, dims.spec());
    let dmixes = b.slice(&g.dmixes, 0..n * width);
    linear_backward(
        b,
        Precision::F32,
        Some((&mut g.dnormed, false)),
        (&mut *gw.mix, None),
        dmixes,
        &a.normed,
        w.mix,
        (n, s * d, width),
    );
    b.rmsnorm_backward(dx, &mut g.dones, &g.dnormed, x, ones, &a.rstd);
}

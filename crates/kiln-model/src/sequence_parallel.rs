//! Sequence parallel (Megatron-LM; Korthikanti et al., "Reducing Activation Recomputation in
//! Large Transformer Models", 2022): under tensor parallel the parts of the model outside the
//! split matrices (the residual stream, the RMSNorms, the embedding's output and the final
//! norm) are cut over the group by tokens, rank r holding a contiguous block of about n/T of
//! the n tokens (`kiln_dist::shard`), where plain tensor parallel repeats them whole on every
//! rank. Around each split block f (attention, MLP or MoE) of a layer:
//!
//!   forward    xn_r  = rmsnorm(x_r)                  the rank's tokens
//!              xn    = all-gather_r xn_r             every token, into f's split matrices
//!              y_r   = (Σ_q f_q(xn))_r               reduce-scatter of the partial products
//!              x'_r  = x_r + y_r
//!   backward   dy    = all-gather_r dx'_r            the adjoint of the reduce-scatter
//!              dxn_r = (Σ_q ∂f_q/∂xn · dy)_r          reduce-scatter, the adjoint of the gather
//!              dx_r  = dx'_r + rmsnorm_backward(dxn_r)
//!
//! An all-reduce is a reduce-scatter and an all-gather, so this moves the bytes plain tensor
//! parallel moves, in the same places. A norm's weight gradient sums over the rank's tokens
//! only: each layer's two are summed over the group (one all-reduce of 2·hidden values), and the
//! final norm's likewise, so every rank's gradients of whole tensors stay the whole model's.
//! The embedding's vocabulary-parallel sum becomes a reduce-scatter (its backward gathers dx
//! first); the final norm runs on the rank's tokens and its output is gathered for the head,
//! whose dL/dxf (whole on every rank) the rank then takes its rows of.
//!
//! DeepSeek-V4's hyper-connections are per token, so its streams (`[tokens, hc_mult · hidden]`)
//! are cut the same way: the collapse, norm, expansion and head run on the rank's tokens, and
//! the mixes' weight gradients are summed over the group with the norms'.
//!
//! What a rank keeps for backward between layers (each layer's input, the residual after
//! attention, the norms' outputs and statistics) is its tokens' only; the gathered normed
//! inputs are gathered again in backward rather than kept. Only training activations are laid
//! out so (`Activations::new`); generation's are whole and run plain tensor parallel.

use crate::config::{AttentionKind, Config};
use crate::tensor_parallel::TensorParallel;
use kiln_core::Backend;
use std::ops::Range;

/// A rank's buffers for sequence parallel, beside its training activations.
pub struct SequenceBufs<B: Backend> {
    /// The rank's tokens (of the activations' `rows × seq`).
    pub tokens: Range<usize>,
    /// Each rank's number of token values (tokens × hidden), for the collectives.
    pub counts: Vec<usize>,
    /// Every token's normed input to a split block (gathered), `[tokens, hidden]`.
    pub whole_in: B::Buf,
    /// Every token's: a split block's partial output, or the gathered output gradient.
    pub whole_out: B::Buf,
    /// The rank's tokens: the final norm's output, or a block's input gradient.
    pub local: B::Buf,
    /// The weight gradients of one layer's parts outside the split blocks, summed over the
    /// rank's tokens, then over the group, before they are added: both norms' (input norm,
    /// then post-attention norm; the final norm's is the first), and DeepSeek-V4's two
    /// hyper-connections' (attention's, then the MoE's; the head's is the first) after them.
    pub douter: B::Buf,
}

impl<B: Backend> SequenceBufs<B> {
    /// The buffers of rank `rank` of `t` over `n` tokens of `cfg`.
    pub fn new(b: &B, cfg: &Config, n: usize, (rank, t): (usize, usize)) -> Self {
        let d = cfg.hidden_size;
        let tokens = kiln_dist::shard(n, rank, t);
        // A layer's hyper-connection: a mixer from S·d to (2 + S)·S values, its bias, 3 scales.
        let hc = match &cfg.attention {
            AttentionKind::V4(v4) => (2 + v4.hc.streams) * v4.hc.streams * (v4.hc.streams * d + 1) + 3,
            _ => 0,
        };
        Self {
            counts: kiln_dist::shard_counts(n, t).into_iter().map(|k| k * d).collect(),
            whole_in: b.zeros(n * d),
            whole_out: b.zeros(n * d),
            local: b.zeros(tokens.len() * d),
            douter: b.zeros(2 * d + 2 * hc),
            tokens,
        }
    }

    /// The rank's rows of `whole` (`[tokens, hidden]`, the same on every rank).
    pub fn rows_of<'a>(&self, b: &B, whole: &'a B::Slice, d: usize) -> &'a B::Slice {
        b.slice(whole, self.tokens.start * d..self.tokens.end * d)
    }
}

impl<B: Backend> TensorParallel<B> {
    /// `whole` ← every rank's token rows `local`, in rank order (`counts` values each).
    pub fn gather_tokens(&self, local: &B::Slice, counts: &[usize], whole: &mut B::Slice, what: &str) {
        (self.group.all_gather_v(local, counts, whole, what)).unwrap_or_else(|e| panic!("sequence parallel: {e:#}"))
    }

    /// `local` ← the rank's token rows of Σ over the group of `whole`.
    pub fn sum_scatter_tokens(&self, whole: &B::Slice, counts: &[usize], local: &mut B::Slice, what: &str) {
        (self.group.reduce_scatter_v_sum(whole, counts, local, what))
            .unwrap_or_else(|e| panic!("sequence parallel: {e:#}"))
    }
}

//! Tensor parallel (Megatron-LM): the T ranks of a group split every layer's attention heads
//! and MLP width, a contiguous block of each per rank, so each holds and computes 1/T of the
//! layers' matrices.
//!
//!   column-parallel, rows of W cut:   q, k, v (and their biases), gate, up
//!       y_r = x·W_rᵀ                  each rank's heads, its block of the MLP width
//!   row-parallel, columns of W cut:   o, down
//!       y = Σ_r y_r·W_rᵀ              a partial product per rank, all-reduced (forward)
//!
//! Backward mirrors it: the output gradient reaches every rank whole, each computes its
//! blocks' weight gradients, and dL/dx of the column-parallel products, Σ_r dy_r·W_r, is a
//! partial sum per rank, all-reduced. So the residual stream and the norms are whole and
//! identical on every rank of the group; their gradients are too, except Qwen3's per-head q/k
//! norms, whose gradients sum over every head and so over the ranks. The embedding and the
//! head are cut by vocabulary rows (`vocab_parallel`), so no rank holds whole logits.
//!
//! A rank's model is the model with heads, KV heads, MLP width and vocabulary divided by T
//! (`local_config`): its layout has the same names with the cut shapes, and the layers run
//! unchanged but for the sums above. A vocabulary T does not divide is cut as evenly as it
//! goes (`kiln_dist::shard`: the first V mod T ranks hold one token more), as every other
//! dimension would be, though only the vocabulary may be cut unevenly. A row-parallel bias (o, down) is whole on every rank
//! and added by rank 0 of the group alone, before the sum.
//!
//! DeepSeek-V3's layers follow the same rule, with whole parts inside a layer:
//!
//!   latent attention:  q_b, kv_b column-parallel (heads), o row-parallel; q_a, kv_a and their
//!                      norms whole. The latents' gradients (dq_a, dc, dk_pe: sums over every
//!                      head) are all-reduced, so the whole parts' weight gradients are whole;
//!                      their dL/dx is then whole too and added by rank 0 alone.
//!   MoE:               each routed and shared expert's width cut like a dense MLP, the router
//!                      whole (every rank routes alike). A routing weight's gradient ⟨dy, E(x)⟩
//!                      reads the expert's output, a partial sum: it is all-reduced, and the
//!                      router's dL/dx, whole, added by rank 0 alone. Under expert parallel the
//!                      expert group is the ranks at the same place of every tensor group.
//!
//! So every rank's dL/dx of a block is a partial sum whose total is the true gradient, and one
//! all-reduce per block finishes it.
//!
//! DeepSeek-V4's attention splits its heads the same way, with the one key/value head whole:
//!
//!   q_b column-parallel (heads), each head's sink with it; the output's groups of heads split
//!   (o_a by group, o_b's columns: row-parallel, summed). q_a, kv, their norms, the compressor
//!   and the lightning indexer whole (every rank picks the same entries). The gradients that sum
//!   over heads (dq_a_norm, the key/value head's, the compressed entries') are all-reduced, so
//!   every whole part's gradient and its dL/dx are whole: x reaches this attention only
//!   through whole parts, so its dL/dx needs no sum at all.
//!
//! The hyper-connections' streams, mixes and norms are whole on every rank, as the residual
//! stream is (cut by tokens under `sequence_parallel`), and its MoE splits as DeepSeek-V3's.

use crate::config::{AttentionKind, Config};
use crate::weights::{TensorSpec, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

/// The group of ranks that split the layers' tensors, and the model as a whole (under expert
/// parallel, with this rank's routed experts only).
pub struct TensorParallel<B: Backend> {
    pub group: Arc<dyn Comm<B::Slice>>,
    /// The whole model's config and layout (what checkpoints hold).
    pub whole: Config,
    pub whole_layout: Weights<TensorSpec>,
}

impl<B: Backend> Clone for TensorParallel<B> {
    fn clone(&self) -> Self {
        Self { group: Arc::clone(&self.group), whole: self.whole.clone(), whole_layout: self.whole_layout.clone() }
    }
}

/// How tensor parallel cuts a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Whole on every rank (norms, routers, latent down-projections, row-parallel biases).
    Whole,
    /// A contiguous block of dimension `k` per rank (`kiln_dist::shard` of it): rows of a
    /// matrix or values of a vector (`Dim(0)`), columns of a matrix (`Dim(1)`), an expert
    /// stack's width (`Dim(1)`, `Dim(2)`).
    Dim(usize),
}

impl Cut {
    /// How `local` (the rank's spec) cuts `whole`: along the first dimension they differ in.
    pub fn of(whole: &TensorSpec, local: &TensorSpec) -> Self {
        match whole.shape.iter().zip(&local.shape).position(|(w, l)| w != l) {
            None => Self::Whole,
            Some(k) => Self::Dim(k),
        }
    }
}

/// `shape` around dimension `k`: (product of the dimensions before, `k`'s, product of those
/// after).
fn around(shape: &[usize], k: usize) -> (usize, usize, usize) {
    (shape[..k].iter().product(), shape[k], shape[k + 1..].iter().product())
}

/// The config of `rank` of `t` ranks: heads (and KV heads, or DeepSeek-V4's output groups)
/// and every MLP's width (dense, routed experts', shared experts') divided by `t`, and the
/// rank's share of the vocabulary. Refuses what the engine cannot split: a `t` that does not
/// divide the heads and widths, or exceeds the vocabulary.
pub fn local_config(whole: &Config, (rank, t): (usize, usize)) -> Result<Config, String> {
    if t > whole.vocab_size {
        return Err(format!("tp = {t} exceeds the model's vocabulary of {} tokens", whole.vocab_size));
    }
    let mut sizes = vec![("attention heads", whole.num_heads)];
    match &whole.attention {
        // DeepSeek-V4's one key/value head is whole on every rank; its output groups split.
        AttentionKind::V4(v4) => sizes.push(("output groups (o_groups)", v4.o_groups)),
        _ => sizes.push(("key/value heads", whole.num_kv_heads)),
    }
    let has_dense = whole.moe.as_ref().is_none_or(|m| m.first_dense_layers > 0);
    if has_dense {
        sizes.push(("MLP width (intermediate_size)", whole.intermediate_size));
    }
    if let Some(moe) = &whole.moe {
        sizes.push(("expert width (moe_intermediate_size)", moe.expert_ff));
    }
    for (what, n) in sizes {
        if !n.is_multiple_of(t) {
            return Err(format!("tp = {t} does not divide the model's {n} {what}"));
        }
    }
    let mut local = whole.clone();
    local.num_heads /= t;
    match &mut local.attention {
        AttentionKind::V4(v4) => v4.o_groups /= t,
        _ => local.num_kv_heads /= t,
    }
    local.vocab_size = kiln_dist::shard(whole.vocab_size, rank, t).len();
    if has_dense {
        local.intermediate_size /= t;
    }
    if let Some(moe) = &mut local.moe {
        moe.expert_ff /= t;
    }
    Ok(local)
}

/// Rank `rank`'s block of `values`, a tensor of shape `whole` cut as `cut` over `t`.
pub fn slice(values: &[f32], whole: &[usize], cut: Cut, (rank, t): (usize, usize)) -> Vec<f32> {
    let Cut::Dim(k) = cut else { return values.to_vec() };
    let (_, dim, inner) = around(whole, k);
    let block = kiln_dist::shard(dim, rank, t);
    let cols = block.start * inner..block.end * inner;
    values.chunks(dim * inner).flat_map(|outer| &outer[cols.clone()]).copied().collect()
}

/// How many values of a tensor of shape `whole` cut as `cut` each of `t` ranks holds.
pub fn block_counts(whole: &[usize], cut: Cut, t: usize) -> Vec<usize> {
    let Cut::Dim(k) = cut else { return vec![whole.iter().product(); t] };
    let (outer, dim, inner) = around(whole, k);
    kiln_dist::shard_counts(dim, t).into_iter().map(|n| outer * n * inner).collect()
}

/// The inverse of `slice` over every rank: the whole tensor from the blocks of ranks 0..t laid
/// end to end (`blocks`, as an all-gather leaves them).
pub fn join(blocks: &[f32], whole: &[usize], cut: Cut, t: usize) -> Vec<f32> {
    let Cut::Dim(k) = cut else { return blocks[..whole.iter().product()].to_vec() };
    let (outer, dim, inner) = around(whole, k);
    let span = dim * inner;
    let mut out = vec![0.0; outer * span];
    let mut rank_blocks = blocks;
    for r in 0..t {
        let cols = kiln_dist::shard(dim, r, t);
        let block = cols.len() * inner;
        let (mine, rest) = rank_blocks.split_at(outer * block);
        for (o, piece) in mine.chunks_exact(block.max(1)).enumerate() {
            out[o * span + cols.start * inner..][..block].copy_from_slice(piece);
        }
        rank_blocks = rest;
    }
    out
}

impl<B: Backend> TensorParallel<B> {
    /// The group `group` splitting the model `whole`, laid out as `whole_layout`.
    pub fn new(group: Arc<dyn Comm<B::Slice>>, whole: &Config, whole_layout: Weights<TensorSpec>) -> Self {
        Self { group, whole: whole.clone(), whole_layout }
    }

    /// Whether this rank adds the whole terms of a partial sum (rank 0 of the group).
    pub fn adds_whole_terms(&self) -> bool {
        self.group.rank() == 0
    }

    /// `buf` ← Σ over the group of `buf` (the partial sums of the row-parallel products in
    /// forward, of dL/dx of the column-parallel ones in backward).
    pub fn sum(&self, buf: &mut B::Slice, what: &str) {
        self.group.all_reduce_sum(buf, what).unwrap_or_else(|e| panic!("tensor parallel: {e:#}"))
    }

    /// The flat ranges (of `local`'s `ranges`) of the tensors the group cuts: their squares
    /// sum over the group in the gradients' norm.
    pub fn cut_ranges(&self, local: &Weights<TensorSpec>, ranges: &Weights<Range<usize>>) -> Vec<Range<usize>> {
        let (whole, local) = (self.whole_layout.iter(), local.iter());
        whole
            .into_iter()
            .zip(local)
            .zip(ranges.iter())
            .filter(|((w, l), _)| Cut::of(w, l) != Cut::Whole)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The whole tensor (laid out as `whole`) from every rank's block of it (`values` here, laid
    /// out as `local`), a collective over the group, on a rank that passes `keep`.
    pub fn join_tensor(
        &self,
        b: &B,
        (whole, local): (&TensorSpec, &TensorSpec),
        values: Vec<f32>,
        keep: bool,
    ) -> Option<Vec<f32>> {
        let cut = Cut::of(whole, local);
        if cut == Cut::Whole {
            return keep.then_some(values);
        }
        let t = self.group.size();
        let counts = block_counts(&whole.shape, cut, t);
        let mut blocks = b.zeros(counts.iter().sum());
        let what = format!("tensor parallel: gathering {}", whole.name);
        let chunk = b.upload(&values);
        self.group.all_gather_v(&chunk, &counts, &mut blocks, &what).unwrap_or_else(|e| panic!("{e:#}"));
        keep.then(|| join(&b.read(&blocks), &whole.shape, cut, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Init;

    fn spec(shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: "w".into(),
            shape: shape.to_vec(),
            parts: vec![],
            keep_f32: false,
            adamw_only: false,
            init: Init::Normal,
        }
    }

    #[test]
    fn slices_join_back_to_the_whole() {
        let whole = spec(&[4, 6]);
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        for (cut, local) in [(Cut::Dim(0), spec(&[2, 6])), (Cut::Dim(1), spec(&[4, 3])), (Cut::Whole, spec(&[4, 6]))] {
            assert_eq!(Cut::of(&whole, &local), cut);
            let blocks: Vec<f32> = (0..2).flat_map(|r| slice(&values, &whole.shape, cut, (r, 2))).collect();
            assert_eq!(join(&blocks, &whole.shape, cut, 2), values);
        }
        // Columns: rank 1 holds columns 3..6 of every row.
        assert_eq!(slice(&values, &whole.shape, Cut::Dim(1), (1, 2))[..3], [3.0, 4.0, 5.0]);
    }

    #[test]
    fn a_dimension_the_ranks_do_not_divide_is_cut_as_evenly_as_it_goes() {
        // A vocabulary of 5 over 2 ranks: rows 0..3 and 3..5 of an embedding [5, 2]; over 3
        // ranks, 2, 2 and 1 rows.
        let whole = spec(&[5, 2]);
        let values: Vec<f32> = (0..10).map(|v| v as f32).collect();
        assert_eq!(slice(&values, &whole.shape, Cut::Dim(0), (1, 2)), [6., 7., 8., 9.]);
        for t in [2, 3] {
            assert_eq!(block_counts(&whole.shape, Cut::Dim(0), t).iter().sum::<usize>(), 10);
            let blocks: Vec<f32> = (0..t).flat_map(|r| slice(&values, &whole.shape, Cut::Dim(0), (r, t))).collect();
            assert_eq!(join(&blocks, &whole.shape, Cut::Dim(0), t), values, "over {t}");
        }
        // Columns of logits [2, 5] over 2 ranks: 3 and 2 of every row.
        let logits = spec(&[2, 5]);
        assert_eq!(slice(&values, &logits.shape, Cut::Dim(1), (1, 2)), [3., 4., 8., 9.]);
        let blocks: Vec<f32> = (0..2).flat_map(|r| slice(&values, &logits.shape, Cut::Dim(1), (r, 2))).collect();
        assert_eq!(join(&blocks, &logits.shape, Cut::Dim(1), 2), values);
    }

    #[test]
    fn deepseek_v4_splits_heads_and_output_groups_and_keeps_its_key_value_head() {
        // The V4 fixture: 4 heads in 2 output groups, one key/value head.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/deepseek_v4/model/config.json");
        let whole = Config::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        let local = local_config(&whole, (1, 2)).unwrap();
        let AttentionKind::V4(v4) = &local.attention else { panic!("a V4 config") };
        assert_eq!((local.num_heads, v4.o_groups, local.num_kv_heads), (2, 1, 1));
        let err = local_config(&whole, (0, 4)).unwrap_err();
        assert!(err.contains("tp = 4 does not divide the model's 2 output groups (o_groups)"), "{err}");
    }

    #[test]
    fn an_expert_stack_cuts_each_experts_width() {
        // Two experts of [4, 3]; cut along the width (dimension 1, over 2 ranks) and along the
        // input (dimension 2, as a down projection stored [experts, hidden, ff], over 3).
        let whole = spec(&[2, 4, 3]);
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let rank1 = slice(&values, &whole.shape, Cut::Dim(1), (1, 2));
        assert_eq!(rank1, [6., 7., 8., 9., 10., 11., 18., 19., 20., 21., 22., 23.]);
        for (cut, local, t) in [(Cut::Dim(1), spec(&[2, 2, 3]), 2), (Cut::Dim(2), spec(&[2, 4, 1]), 3)] {
            assert_eq!(Cut::of(&whole, &local), cut);
            let blocks: Vec<f32> = (0..t).flat_map(|r| slice(&values, &whole.shape, cut, (r, t))).collect();
            assert_eq!(join(&blocks, &whole.shape, cut, t), values, "{cut:?}");
            // Loading cuts each expert as it is read: the same block, expert by expert.
            let Cut::Dim(k) = cut else { unreachable!() };
            for r in 0..t {
                let by_expert: Vec<f32> =
                    values.chunks(12).flat_map(|e| slice(e, &whole.shape[1..], Cut::Dim(k - 1), (r, t))).collect();
                assert_eq!(by_expert, slice(&values, &whole.shape, cut, (r, t)), "{cut:?} rank {r}");
            }
        }
    }
}

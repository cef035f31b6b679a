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
//! partial sum per rank, all-reduced. So the residual stream, the norms, the embedding and the
//! head are whole and identical on every rank of the group; their gradients are too, except
//! Qwen3's per-head q/k norms, whose gradients sum over every head and so over the ranks.
//!
//! A rank's model is the model with heads, KV heads and MLP width divided by T
//! (`local_config`): its layout has the same names with the cut shapes, and the layers run
//! unchanged but for the sums above. A row-parallel bias (o, down) is whole on every rank
//! and added by rank 0 of the group alone, before the sum.

use crate::config::{AttentionKind, Config};
use crate::weights::{TensorSpec, Weights};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::ops::Range;
use std::sync::Arc;

/// The group of ranks that split the layers' tensors, and the model as a whole.
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
    /// Whole on every rank (norms, embedding, head, row-parallel biases).
    Whole,
    /// A block of rows (of a matrix), or of values (of a vector) per rank.
    Rows,
    /// A block of columns per rank.
    Cols,
}

impl Cut {
    /// How `local` (the rank's spec) cuts `whole`.
    pub fn of(whole: &TensorSpec, local: &TensorSpec) -> Self {
        if whole.shape == local.shape {
            Self::Whole
        } else if whole.shape[0] != local.shape[0] {
            Self::Rows
        } else {
            Self::Cols
        }
    }
}

/// The config of one of `t` ranks: heads, KV heads and MLP width divided by `t`. Refuses what
/// the engine cannot split: a `t` that does not divide them, and models other than the Llama
/// family (multi-head latent attention, MoE and DeepSeek-V4 layers).
pub fn local_config(whole: &Config, t: usize) -> Result<Config, String> {
    let name = format!("{:?}", whole.model_type).to_lowercase();
    if !matches!(whole.attention, AttentionKind::Gqa) || whole.moe.is_some() {
        return Err(format!(
            "tensor parallel splits grouped-query attention and dense MLPs (the Llama family); {name}'s \
             latent attention or MoE layers are not split yet"
        ));
    }
    for (what, n) in [
        ("attention heads", whole.num_heads),
        ("key/value heads", whole.num_kv_heads),
        ("MLP width (intermediate_size)", whole.intermediate_size),
    ] {
        if !n.is_multiple_of(t) {
            return Err(format!("tp = {t} does not divide the model's {n} {what}"));
        }
    }
    let mut local = whole.clone();
    local.num_heads /= t;
    local.num_kv_heads /= t;
    local.intermediate_size /= t;
    Ok(local)
}

/// Rank `rank`'s block of `values`, a tensor laid out as `whole` and cut as `cut` over `t`.
pub fn slice(values: &[f32], whole: &TensorSpec, cut: Cut, (rank, t): (usize, usize)) -> Vec<f32> {
    match cut {
        Cut::Whole => values.to_vec(),
        Cut::Rows => {
            let per = values.len() / t;
            values[rank * per..(rank + 1) * per].to_vec()
        }
        Cut::Cols => {
            let cols = whole.shape[1];
            let per = cols / t;
            values.chunks(cols).flat_map(|row| &row[rank * per..(rank + 1) * per]).copied().collect()
        }
    }
}

/// The inverse of `slice` over every rank: the whole tensor from the blocks of ranks 0..t laid
/// end to end (`blocks`, as an all-gather leaves them).
pub fn join(blocks: &[f32], whole: &TensorSpec, cut: Cut, t: usize) -> Vec<f32> {
    match cut {
        Cut::Whole => blocks[..whole.numel()].to_vec(),
        Cut::Rows => blocks.to_vec(),
        Cut::Cols => {
            let (rows, cols) = (whole.shape[0], whole.shape[1]);
            let per = cols / t;
            let mut out = vec![0.0; rows * cols];
            for (r, block) in blocks.chunks(rows * per).enumerate() {
                for (i, row) in block.chunks(per).enumerate() {
                    out[i * cols + r * per..i * cols + (r + 1) * per].copy_from_slice(row);
                }
            }
            out
        }
    }
}

impl<B: Backend> TensorParallel<B> {
    /// The group `group` splitting the model `whole`.
    pub fn new(group: Arc<dyn Comm<B::Slice>>, whole: &Config) -> Self {
        Self { group, whole: whole.clone(), whole_layout: crate::weights::layout(whole) }
    }

    /// `buf` ← Σ over the group of `buf` (the partial sums of the row-parallel products in
    /// forward, of dL/dx of the column-parallel ones in backward).
    pub fn sum(&self, buf: &mut B::Slice, what: &str) {
        self.group.all_reduce_sum(buf, what).unwrap_or_else(|e| panic!("tensor parallel: {e:#}"))
    }

    /// This rank's blocks (laid out as `local_layout`) of the whole tensors `whole`.
    pub fn blocks(&self, whole: &Weights<Vec<f32>>, local_layout: &Weights<TensorSpec>) -> Weights<Vec<f32>> {
        let (rank, t) = (self.group.rank(), self.group.size());
        let specs = self.whole_layout.iter().into_iter().zip(local_layout.iter());
        let mut blocks = specs
            .zip(whole.iter())
            .map(|((whole_spec, spec), values)| slice(values, whole_spec, Cut::of(whole_spec, spec), (rank, t)));
        local_layout.map(|_| blocks.next().expect("a tensor per spec"))
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

    /// The whole tensors from every rank's blocks `local` (a collective over the group), on a
    /// rank that passes `keep`; the others take part and get `None`.
    pub fn join_all(
        &self,
        b: &B,
        local: &Weights<Vec<f32>>,
        local_layout: &Weights<TensorSpec>,
        keep: bool,
    ) -> Option<Weights<Vec<f32>>> {
        let t = self.group.size();
        let mut joined = self.whole_layout.iter().into_iter().zip(local_layout.iter()).zip(local.iter()).map(
            |((whole, spec), values)| {
                let cut = Cut::of(whole, spec);
                if cut == Cut::Whole {
                    return values.clone();
                }
                let mut blocks = b.zeros(values.len() * t);
                let what = format!("tensor parallel: gathering {}", whole.name);
                let chunk = b.upload(values);
                self.group
                    .all_gather_v(&chunk, &vec![values.len(); t], &mut blocks, &what)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                if keep {
                    join(&b.read(&blocks), whole, cut, t)
                } else {
                    Vec::new()
                }
            },
        );
        let joined = self.whole_layout.map(|_| joined.next().expect("a tensor per spec"));
        keep.then_some(joined)
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
        for (cut, local) in [(Cut::Rows, spec(&[2, 6])), (Cut::Cols, spec(&[4, 3])), (Cut::Whole, spec(&[4, 6]))] {
            assert_eq!(Cut::of(&whole, &local), cut);
            let blocks: Vec<f32> = (0..2).flat_map(|r| slice(&values, &whole, cut, (r, 2))).collect();
            assert_eq!(join(&blocks, &whole, cut, 2), values);
        }
        // Columns: rank 1 holds columns 3..6 of every row.
        assert_eq!(slice(&values, &whole, Cut::Cols, (1, 2))[..3], [3.0, 4.0, 5.0]);
    }
}

//! Vocabulary parallel (Megatron-LM): under tensor parallel the embedding and the LM head are
//! cut by vocabulary rows too, a contiguous block of about V/T tokens per rank (rank r's from
//! `first_r`, `kiln_dist::shard`), so no rank holds a whole row of logits.
//!
//!   embedding:  x = Σ_r E_r[id − first_r]     zero rows for the tokens a rank does not hold,
//!                                             all-reduced; backward scatters the whole dx
//!                                             into the rank's own rows only
//!   head:       z_r = x·W_rᵀ                  the rank's columns of the logits
//!               dx = Σ_r dz_r·W_r             a partial product per rank, all-reduced
//!   losses:     each rank's rows' statistics (max, log Σ exp over its block, the target's
//!               logit where it holds the target), all-gathered, give every rank the whole
//!               rows' lse = log Σ_r exp(lse_r), so nll = lse − z_t and each rank writes its
//!               block's gradient w·(exp(z − lse) − onehot); reverse KL sums the blocks'
//!               parts of Σ p (log p − log q) before its gradient.
//!
//! Without tensor parallel each loss is the backend's whole-row kernel. Generation samples from
//! whole rows: the few rows it reads are all-gathered.

use crate::activations::Activations;
use crate::model::Model;
use crate::tensor_parallel::{block_counts, join, Cut, TensorParallel};
use kiln_core::Backend;
use std::borrow::Cow;

impl<B: Backend> Model<B> {
    /// The tensor group splitting the vocabulary, with this rank's first token.
    fn vocab_block(&self) -> Option<(&TensorParallel<B>, usize)> {
        let tp = self.tensor_parallel.as_ref()?;
        Some((tp, kiln_dist::shard(tp.whole.vocab_size, tp.group.rank(), tp.group.size()).start))
    }

    /// The embedding rows of `ids` this rank holds: the ids, or under vocabulary parallel their
    /// rows in the rank's block (−1 for a token another rank holds).
    pub(crate) fn embedding_rows<'a>(&self, ids: &'a [i32]) -> Cow<'a, [i32]> {
        let Some((_, first)) = self.vocab_block() else { return Cow::Borrowed(ids) };
        let block = first as i32..(first + self.config.vocab_size) as i32;
        ids.iter().map(|id| if block.contains(id) { id - block.start } else { -1 }).collect()
    }

    /// Under vocabulary parallel, `x` (a sum of every rank's embedding rows or head
    /// gradients) summed over the tensor group.
    pub(crate) fn sum_over_vocab(&self, x: &mut B::Slice, what: &str) {
        if let Some((tp, _)) = self.vocab_block() {
            tp.sum(x, what);
        }
    }

    /// Every token's nll and correctness (`acts.nll`, `acts.correct`) from `acts.logits`.
    pub(crate) fn cross_entropy_forward(&self, b: &B, acts: &mut Activations<B>) {
        let vocab = self.config.vocab_size;
        match self.whole_rows(b, acts) {
            None => {
                b.cross_entropy_forward(&mut acts.nll, &mut acts.correct, &acts.logits, &acts.inputs.targets, vocab)
            }
            Some(rows) => rows.write(b, acts),
        }
    }

    /// `cross_entropy_forward` fused with the gradient of `Σ_t weight[t] · nll[t]`
    /// (`acts.inputs.weights`), written over `acts.logits`.
    pub(crate) fn cross_entropy_backward(&self, b: &B, acts: &mut Activations<B>) {
        let vocab = self.config.vocab_size;
        let Some(rows) = self.whole_rows(b, acts) else {
            let inputs = &acts.inputs;
            let (nll, correct) = (&mut acts.nll, &mut acts.correct);
            return b.cross_entropy_backward(&mut acts.logits, nll, correct, &inputs.targets, &inputs.weights, vocab);
        };
        rows.write(b, acts);
        let (_, first) = self.vocab_block().expect("vocabulary parallel");
        let (lse, inputs) = (b.upload(&rows.lse), &acts.inputs);
        b.cross_entropy_block_backward(&mut acts.logits, &lse, &inputs.targets, &inputs.weights, vocab, first);
    }

    /// The reverse KL of every token from `acts.logits` to `teacher` (`acts.nll`), fused with
    /// the gradient of `Σ_t weight[t] · KL_t`, written over `acts.logits`.
    pub(crate) fn reverse_kl_backward(&self, b: &B, acts: &mut Activations<B>, teacher: &B::Slice) {
        let vocab = self.config.vocab_size;
        let Some((tp, _)) = self.vocab_block() else {
            return b.reverse_kl_backward(&mut acts.logits, &mut acts.nll, teacher, &acts.inputs.weights, vocab);
        };
        let rows = acts.rows * acts.seq;
        let student = self.gathered_stats(b, tp, &acts.logits, &acts.inputs.targets, rows);
        let teacher_stats = self.gathered_stats(b, tp, teacher, &acts.inputs.targets, rows);
        let lse: Vec<f32> =
            (0..rows).flat_map(|r| [two_f32(student.lse(r)), two_f32(teacher_stats.lse(r))].concat()).collect();
        let lse = b.upload(&lse);
        b.reverse_kl_block_forward(&mut acts.nll, &acts.logits, teacher, &lse, vocab);
        tp.sum(&mut acts.nll, "vocabulary parallel: reverse KL");
        b.reverse_kl_block_backward(&mut acts.logits, teacher, &lse, &acts.nll, &acts.inputs.weights, vocab);
    }

    /// Under vocabulary parallel, the whole rows' cross-entropy from every rank's block
    /// statistics of `acts.logits`.
    fn whole_rows(&self, b: &B, acts: &Activations<B>) -> Option<WholeRows> {
        let (tp, _) = self.vocab_block()?;
        let rows = acts.rows * acts.seq;
        let stats = self.gathered_stats(b, tp, &acts.logits, &acts.inputs.targets, rows);
        let targets = b.read_index(&acts.inputs.targets);
        let mut whole = WholeRows { lse: Vec::with_capacity(2 * rows), nll: vec![0.0; rows], correct: vec![0.0; rows] };
        for (r, &target) in targets.iter().enumerate() {
            let lse = stats.lse(r);
            whole.lse.extend(two_f32(lse));
            if target >= 0 {
                // Only the rank holding the target gives its logit; the others give 0.
                let target_logit: f32 = stats.of_row(r, 2).sum();
                whole.nll[r] = (lse - target_logit as f64) as f32;
                whole.correct[r] =
                    f32::from(u8::from(target_logit >= stats.of_row(r, 0).fold(f32::NEG_INFINITY, f32::max)));
            }
        }
        Some(whole)
    }

    /// Every rank's `vocab_block_stats` of `logits`.
    fn gathered_stats(
        &self,
        b: &B,
        tp: &TensorParallel<B>,
        logits: &B::Slice,
        targets: &B::Index,
        rows: usize,
    ) -> BlockStats {
        let (vocab, first) = (self.config.vocab_size, self.vocab_block().expect("vocabulary parallel").1);
        let mut stats = b.zeros(3 * rows);
        b.vocab_block_stats(&mut stats, logits, targets, vocab, first);
        let t = tp.group.size();
        let mut all = b.zeros(3 * rows * t);
        tp.group
            .all_gather_v(&stats, &vec![3 * rows; t], &mut all, "vocabulary parallel: loss statistics")
            .unwrap_or_else(|e| panic!("tensor parallel: {e:#}"));
        BlockStats { all: b.read(&all), rows }
    }

    /// The whole rows of `logits` (`rows` of this rank's block of the vocabulary), for
    /// sampling: all-gathered under vocabulary parallel.
    pub(crate) fn whole_logits(&self, b: &B, logits: Vec<f32>, rows: usize) -> Vec<f32> {
        let Some((tp, _)) = self.vocab_block() else { return logits };
        let whole = [rows, tp.whole.vocab_size];
        let (cut, t) = (Cut::Dim(1), tp.group.size());
        let counts = block_counts(&whole, cut, t);
        let mut all = b.zeros(counts.iter().sum());
        tp.group
            .all_gather_v(&b.upload(&logits), &counts, &mut all, "vocabulary parallel: logits")
            .unwrap_or_else(|e| panic!("tensor parallel: {e:#}"));
        join(&b.read(&all), &whole, cut, t)
    }
}

/// Every rank's `vocab_block_stats` of a block of the vocabulary, rank after rank
/// (`[T][rows·3]`: max, log Σ exp below it, the target's logit or 0).
struct BlockStats {
    all: Vec<f32>,
    rows: usize,
}

impl BlockStats {
    /// Statistic `k` of row `r`, rank after rank.
    fn of_row(&self, r: usize, k: usize) -> impl Iterator<Item = f32> + Clone + '_ {
        self.all.chunks(3 * self.rows).map(move |s| s[3 * r + k])
    }

    /// The whole row's `log Σ exp`, in f64.
    fn lse(&self, r: usize) -> f64 {
        log_sum_exp(self.of_row(r, 0).zip(self.of_row(r, 1)).map(|(max, log_sum)| max as f64 + log_sum as f64))
    }
}

/// The whole rows' cross-entropy under vocabulary parallel: each row's lse (as two values,
/// see `Backend::cross_entropy_block_backward`), nll and correctness.
struct WholeRows {
    lse: Vec<f32>,
    nll: Vec<f32>,
    correct: Vec<f32>,
}

impl WholeRows {
    fn write<B: Backend>(&self, b: &B, acts: &mut Activations<B>) {
        b.write(&mut acts.nll, &self.nll);
        b.write(&mut acts.correct, &self.correct);
    }
}

/// `log Σ exp(x)` in f64.
fn log_sum_exp(x: impl Iterator<Item = f64> + Clone) -> f64 {
    let top = x.clone().fold(f64::NEG_INFINITY, f64::max);
    top + x.map(|v| (v - top).exp()).sum::<f64>().ln()
}

/// `x` as two f32 values whose sum keeps f64's precision.
fn two_f32(x: f64) -> [f32; 2] {
    let hi = x as f32;
    [hi, (x - hi as f64) as f32]
}

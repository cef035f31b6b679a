//! Completions laid out as training rows, for the on-policy recipes (RL, distillation) and for
//! rescoring what the generator sampled.
//!
//! Separate: one row per completion, prompt then completion. Prompt-shared: consecutive
//! completions of one prompt (a GRPO group) are laid out as one group, the prompt once and the
//! completions after it, so that the prompt's positions are computed once and their gradients
//! summed over the group's completions:
//!
//! ```text
//!   group g:  p₀ … p_{P−2}   │ p_{P−1} a₁ … a_m │ p_{P−1} b₁ … b_n │ …
//!   segment:  shared_prefix(g)│ (g, 0)           │ (g, 1)           │
//!   position: 0 … P−2         │ P−1 … P−1+m      │ P−1 … P−1+n      │
//! ```
//!
//! Each completion sees its group's prefix and itself (attention's group segments), with the
//! positions it has in its own row. The prompt's last token starts every completion's segment:
//! its logits predict that completion's first token, a target per completion. Groups are dealt
//! onto as many rows as pad least (a group's length varies with its completions', and every
//! row pads to the longest), often one. Both layouts give the same log-probs and gradients up
//! to f32 rounding (blocks and sums fall differently).

use crate::Batch;
use kiln_core::{group_segment, shared_prefix};

/// A micro-batch of completions (`(prompt + completion ids, prompt length)`) as training rows.
pub struct CompletionRows {
    pub batch: Batch,
    /// Of each completion, the batch position whose next-token target is its first completion
    /// token; its later tokens' positions follow it.
    first: Vec<usize>,
    /// Of each completion, how many completion tokens it has.
    lengths: Vec<usize>,
}

/// Whether two completions hold the same prompt.
fn same_prompt((a, p): &(Vec<i32>, usize), (b, q): &(Vec<i32>, usize)) -> bool {
    p == q && a[..*p] == b[..*q]
}

/// Runs of consecutive completions with the same prompt.
fn groups(sequences: &[(Vec<i32>, usize)]) -> Vec<&[(Vec<i32>, usize)]> {
    sequences.chunk_by(same_prompt).collect()
}

/// A row length rounded up to a multiple of 32, so that few layouts recur.
fn rounded(longest: usize) -> usize {
    longest.max(1).next_multiple_of(32)
}

/// Groups of the given lengths dealt onto rows, as the groups' indices per row, and the rows'
/// length: for every row count, the longest group first onto the shortest row so far; of the
/// counts whose rows are at most twice the longest group (an attention kernel that does not
/// skip other groups' key blocks then does at most twice its work), the one whose rows hold
/// the fewest positions in all (on a tie, more rows).
fn deal(lengths: &[usize]) -> (Vec<Vec<usize>>, usize) {
    let mut longest_first: Vec<usize> = (0..lengths.len()).collect();
    longest_first.sort_by_key(|&g| std::cmp::Reverse(lengths[g]));
    let longest = rounded(lengths.iter().copied().max().unwrap_or(1));
    let dealt = |rows: usize| {
        let (mut members, mut load) = (vec![Vec::new(); rows], vec![0; rows]);
        for &g in &longest_first {
            let r = (0..rows).min_by_key(|&r| load[r]).expect("a row");
            members[r].push(g);
            load[r] += lengths[g];
        }
        members.iter_mut().for_each(|m| m.sort_unstable());
        (members, rounded(load.into_iter().max().unwrap_or(1)))
    };
    (1..=lengths.len().max(1))
        .map(dealt)
        .filter(|(_, seq)| *seq <= 2 * longest)
        .min_by_key(|(members, seq)| (members.len() * seq, std::cmp::Reverse(members.len())))
        .expect("one row per group always qualifies: none is longer than the longest group")
}

impl CompletionRows {
    /// The rows of `sequences`, with weight `weight` on each completion token's target:
    /// prompt-shared when `share_prompts`, else one per completion, `max_seq` at most (the
    /// longest rounded up to a multiple of 32).
    pub fn new(sequences: &[(Vec<i32>, usize)], max_seq: usize, share_prompts: bool, weight: f32) -> Self {
        assert!(sequences.iter().all(|(ids, p)| *p >= 1 && *p <= ids.len()), "a completion needs a prompt");
        let lengths = sequences.iter().map(|(ids, p)| ids.len() - p).collect();
        if !share_prompts {
            let seq = rounded(sequences.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1)).min(max_seq);
            let first = sequences.iter().enumerate().map(|(r, (_, p))| r * seq + p - 1).collect();
            return Self { batch: Batch::completions(sequences, seq, weight), first, lengths };
        }
        let groups = groups(sequences);
        let group_len =
            |g: &[(Vec<i32>, usize)]| g[0].1 - 1 + g.iter().map(|(ids, p)| ids.len() - p + 1).sum::<usize>();
        let lengths_of_groups: Vec<usize> = groups.iter().map(|g| group_len(g)).collect();
        let (rows_of_groups, seq) = deal(&lengths_of_groups);
        let mut batch = Batch::padding(rows_of_groups.len(), seq);
        let mut first = vec![0; sequences.len()];
        let group_start: Vec<usize> = (groups.iter())
            .scan(0, |at, g| {
                *at += g.len();
                Some(*at - g.len())
            })
            .collect();
        for (r, row) in rows_of_groups.iter().enumerate() {
            let mut at = r * seq;
            for (member_of_row, &gi) in row.iter().enumerate() {
                let group = groups[gi];
                let (prompt, p) = (&group[0].0, group[0].1);
                for (t, &id) in prompt[..p - 1].iter().enumerate() {
                    (batch.ids[at], batch.positions[at], batch.segments[at]) =
                        (id, t as i32, shared_prefix(member_of_row));
                    at += 1;
                }
                for (k, (ids, _)) in group.iter().enumerate() {
                    first[group_start[gi] + k] = at;
                    let segment = group_segment(member_of_row, k);
                    for (t, &id) in ids.iter().enumerate().skip(p - 1) {
                        (batch.ids[at], batch.positions[at], batch.segments[at]) = (id, t as i32, segment);
                        if let Some(&next) = ids.get(t + 1) {
                            (batch.targets[at], batch.weights[at]) = (next, weight);
                        }
                        at += 1;
                    }
                }
            }
        }
        Self { batch, first, lengths }
    }

    /// Of each completion, its tokens' values in a per-position vector of the batch (such as
    /// the forward's nll).
    pub fn per_completion<'a>(&'a self, values: &'a [f32]) -> impl Iterator<Item = &'a [f32]> + 'a {
        assert_eq!(values.len(), self.batch.tokens(), "one value per batch position expected");
        self.first.iter().zip(&self.lengths).map(move |(&f, &n)| &values[f..f + n])
    }

    /// A per-position vector of the batch holding each completion's token values (such as
    /// loss weights), zero elsewhere.
    pub fn scatter(&self, per_completion: &[Vec<f32>]) -> Vec<f32> {
        let mut out = vec![0.0; self.batch.tokens()];
        for ((&f, &n), values) in self.first.iter().zip(&self.lengths).zip(per_completion) {
            assert_eq!(values.len(), n, "one value per completion token expected");
            out[f..f + n].copy_from_slice(values);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_its_prompt_and_each_completion_restarts_at_the_prompts_last_token() {
        // Two completions of prompt [5, 6, 7], then one of prompt [8]: one row holds both groups.
        let sequences = vec![(vec![5, 6, 7, 1, 2], 3), (vec![5, 6, 7, 3], 3), (vec![8, 4, 9], 1)];
        let rows = CompletionRows::new(&sequences, 64, true, 0.5);
        let b = &rows.batch;
        assert_eq!((b.rows, b.seq), (1, 32));
        let (p, a, c, d) = (shared_prefix(0), group_segment(0, 0), group_segment(0, 1), group_segment(1, 0));
        assert_eq!(&b.ids[..10], &[5, 6, 7, 1, 2, 7, 3, 8, 4, 9]);
        assert_eq!(&b.positions[..10], &[0, 1, 2, 3, 4, 2, 3, 0, 1, 2]);
        assert_eq!(&b.segments[..11], &[p, p, a, a, a, c, c, d, d, d, -1]);
        assert_eq!(&b.targets[..11], &[-1, -1, 1, 2, -1, 3, -1, 4, 9, -1, -1]);
        assert_eq!(&b.weights[..10], &[0.0, 0.0, 0.5, 0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0]);
        let nll: Vec<f32> = (0..b.tokens()).map(|i| i as f32).collect();
        let got: Vec<&[f32]> = rows.per_completion(&nll).collect();
        assert_eq!(got, vec![&[2.0, 3.0][..], &[5.0][..], &[7.0, 8.0][..]]);
        assert_eq!(rows.scatter(&[vec![1.0, 2.0], vec![3.0], vec![4.0, 5.0]]).iter().sum::<f32>(), 15.0);
    }

    #[test]
    fn groups_are_dealt_onto_the_rows_that_pad_least() {
        // GRPO's groups of one step: 4 rows of 832 positions against 8 of 512 (one row of
        // 3,136 would be more than twice the longest group).
        let (rows, seq) = deal(&[438, 411, 315, 393, 434, 291, 355, 499]);
        assert_eq!((rows, seq), (vec![vec![5, 7], vec![0, 2], vec![4, 6], vec![1, 3]], 832));
        // Two rows of 32 hold as many positions as one of 64: the two rows win.
        assert_eq!(deal(&[30, 30]), (vec![vec![0], vec![1]], 32));
        // One row of 224 pads least, and is at most twice the longest (128).
        assert_eq!(deal(&[60, 100, 40]), (vec![vec![0, 1, 2]], 224));
    }

    #[test]
    fn separate_rows_hold_one_completion_each() {
        let sequences = vec![(vec![5, 6, 7, 1, 2], 3), (vec![5, 6, 7, 3], 3)];
        let rows = CompletionRows::new(&sequences, 16, false, 1.0);
        assert_eq!((rows.batch.rows, rows.batch.seq), (2, 16));
        assert_eq!(rows.batch, crate::Batch::completions(&sequences, 16, 1.0));
        let nll: Vec<f32> = (0..32).map(|i| i as f32).collect();
        assert_eq!(rows.per_completion(&nll).collect::<Vec<_>>(), vec![&[2.0, 3.0][..], &[18.0][..]]);
    }
}

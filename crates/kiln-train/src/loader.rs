//! The training data order: examples packed into rows, rows grouped into micro-batches,
//! micro-batches into optimizer steps. The order is a pure function of the seed and the
//! step number, so resuming needs nothing but the step.

use kiln_core::group_segment;
use kiln_core::rng::Rng;
use kiln_data::example::Example;
use kiln_data::packing::best_fit_decreasing;
use kiln_model::Batch;

/// Example indices per packed row.
pub type PackedRow = Vec<usize>;

pub struct DataOrder {
    /// Micro-batches (lists of rows) of the packed dataset, before any shuffle.
    pub micro_batches: Vec<Vec<PackedRow>>,
    pub grad_accum: usize,
    seed: u64,
    /// The shuffled micro-batch order of the last epoch asked for, so a step costs O(grad_accum)
    /// rather than a reshuffle of the whole epoch.
    epoch_order: std::cell::RefCell<Option<(u64, Vec<usize>)>>,
}

/// Packs examples into rows of `seq` tokens (best fit decreasing) and groups `rows` of them
/// per micro-batch; `shuffle` reorders the packed rows with the seed first.
pub fn pack(examples: &[Example], rows: usize, seq: usize, shuffle: Option<u64>) -> Vec<Vec<PackedRow>> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mut packed = best_fit_decreasing(&lengths, seq);
    if let Some(seed) = shuffle {
        let mut rng = Rng::new(seed);
        for i in (1..packed.len()).rev() {
            packed.swap(i, rng.below(i + 1));
        }
    }
    packed.chunks(rows).map(<[PackedRow]>::to_vec).collect()
}

impl DataOrder {
    pub fn new(examples: &[Example], rows: usize, seq: usize, grad_accum: usize, seed: u64) -> Self {
        Self::from_micro_batches(pack(examples, rows, seq, None), grad_accum, seed)
    }

    /// An order over micro-batches packed some other way (`pack_groups`).
    pub fn from_micro_batches(micro_batches: Vec<Vec<PackedRow>>, grad_accum: usize, seed: u64) -> Self {
        Self { micro_batches, grad_accum, seed, epoch_order: Default::default() }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.micro_batches.len().div_ceil(self.grad_accum) as u64
    }

    /// The micro-batches (indices into `micro_batches`) of 0-based optimizer step `step`:
    /// epoch `e` visits the packed micro-batches in an order shuffled by (seed, e).
    pub fn step(&self, step: u64) -> Vec<usize> {
        let per_epoch = self.steps_per_epoch();
        let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
        let mut cache = self.epoch_order.borrow_mut();
        if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.micro_batches.len()).collect();
            let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            *cache = Some((epoch, order));
        }
        let order = &cache.as_ref().expect("filled above").1;
        let end = ((k + 1) * self.grad_accum).min(order.len());
        order[k * self.grad_accum..end].to_vec()
    }
}

/// Packs groups of `group` consecutive examples (a preference pair's chosen and rejected
/// sequences; or single examples, whose order is kept) into micro-batches of `rows` rows of
/// `seq` tokens, first fit in order, so that a group always shares a micro-batch. `None` when
/// a group cannot fit in an empty micro-batch.
pub fn pack_groups(examples: &[Example], group: usize, rows: usize, seq: usize) -> Option<Vec<Vec<PackedRow>>> {
    let mut batches = Vec::new();
    let mut current: Vec<(PackedRow, usize)> = vec![(Vec::new(), 0); rows];
    let place = |rows: &mut Vec<(PackedRow, usize)>, i: usize| -> bool {
        let len = examples[i].ids.len();
        match rows.iter_mut().find(|(_, used)| used + len <= seq) {
            Some((row, used)) => {
                row.push(i);
                *used += len;
                true
            }
            None => false,
        }
    };
    let fits = |rows: &mut Vec<(PackedRow, usize)>, g: usize| (g * group..(g + 1) * group).all(|i| place(rows, i));
    for g in 0..examples.len() / group {
        let mut trial = current.clone();
        if !fits(&mut trial, g) {
            batches.push(std::mem::replace(&mut current, vec![(Vec::new(), 0); rows]));
            trial = current.clone();
            if !fits(&mut trial, g) {
                return None;
            }
        }
        current = trial;
    }
    batches.push(current);
    Some(
        batches
            .into_iter()
            .map(|b| b.into_iter().map(|(row, _)| row).filter(|r| !r.is_empty()).collect::<Vec<_>>())
            .filter(|b: &Vec<PackedRow>| !b.is_empty())
            .collect(),
    )
}

/// Where each example of a micro-batch lies in its `build_batch` layout: `(example, first
/// token index)`; the example covers `examples[i].ids.len()` tokens from there.
pub fn sequence_spans(micro_batch: &[PackedRow], examples: &[Example], seq: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    for (r, row) in micro_batch.iter().enumerate() {
        let mut t = r * seq;
        for &i in row {
            spans.push((i, t));
            t += examples[i].ids.len();
        }
    }
    spans
}

/// The first rows of a step's micro-batches, as `file:line` locations (for warnings).
pub fn describe_rows<'a>(examples: &[Example], micro_batches: impl IntoIterator<Item = &'a Vec<PackedRow>>) -> String {
    let rows: Vec<&str> = micro_batches
        .into_iter()
        .flat_map(|mb| mb.iter().flatten())
        .map(|&i| examples[i].location.as_str())
        .take(8)
        .collect();
    rows.join(", ")
}

/// Trainable targets in a micro-batch.
pub fn trainable_targets(examples: &[Example], micro_batch: &[PackedRow]) -> usize {
    micro_batch.iter().flatten().map(|&i| examples[i].trainable_targets()).sum()
}

/// Tokens (not padding) of a micro-batch.
pub fn real_tokens(examples: &[Example], micro_batch: &[PackedRow]) -> usize {
    micro_batch.iter().flatten().map(|&i| examples[i].ids.len()).sum()
}

/// A `rows × seq` batch of packed rows: positions restart and segment ids change at each
/// example, every trainable target has weight `weight`, padding has none.
pub fn build_batch(examples: &[Example], micro_batch: &[PackedRow], rows: usize, seq: usize, weight: f32) -> Batch {
    let mut b = Batch::padding(rows, seq);
    for (r, row) in micro_batch.iter().enumerate() {
        let mut t = r * seq;
        for (segment, &i) in row.iter().enumerate() {
            let e = &examples[i];
            for p in 0..e.ids.len() {
                b.ids[t] = e.ids[p] as i32;
                b.positions[t] = p as i32;
                b.segments[t] = group_segment(0, segment);
                if p + 1 < e.ids.len() && e.trainable[p + 1] {
                    b.targets[t] = e.ids[p + 1] as i32;
                    b.weights[t] = weight;
                }
                t += 1;
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, first_trainable: usize) -> Example {
        Example {
            ids: (0..len as u32).map(|i| i + 10).collect(),
            trainable: (0..len).map(|t| t >= first_trainable).collect(),
            location: String::new(),
        }
    }

    #[test]
    fn packed_batch_has_restarting_positions_and_masked_targets() {
        let examples = vec![ex(3, 1), ex(4, 2)];
        let b = build_batch(&examples, &[vec![0, 1]], 2, 8, 0.5);
        assert_eq!(&b.positions[..8], &[0, 1, 2, 0, 1, 2, 3, 0]);
        assert_eq!(&b.segments[..8], &[0, 0, 0, 1, 1, 1, 1, -1]);
        // Example 0 predicts 11, 12; example 1 only 12, 13 (its first target is masked).
        assert_eq!(&b.targets[..8], &[11, 12, -1, -1, 12, 13, -1, -1]);
        assert_eq!(b.weights.iter().filter(|&&w| w == 0.5).count(), 4);
        assert!(b.segments[8..].iter().all(|&s| s == -1), "the second row is padding");
    }

    #[test]
    fn pairs_share_a_micro_batch() {
        let examples: Vec<Example> = (0..20).map(|i| ex(3 + i % 5, 1)).collect();
        let batches = pack_groups(&examples, 2, 2, 12).unwrap();
        let mut seen = vec![0; examples.len()];
        for mb in &batches {
            assert!(mb.len() <= 2);
            let members: Vec<usize> = mb.iter().flatten().copied().collect();
            for &i in &members {
                seen[i] += 1;
                assert!(members.contains(&(i ^ 1)), "example {i} without its pair partner");
            }
            for row in mb {
                assert!(row.iter().map(|&i| examples[i].ids.len()).sum::<usize>() <= 12);
            }
            let spans = sequence_spans(mb, &examples, 12);
            assert_eq!(spans.len(), members.len());
        }
        assert!(seen.iter().all(|&n| n == 1), "every sequence placed once");
        assert!(pack_groups(&[ex(10, 1), ex(10, 1)], 2, 1, 12).is_none(), "a pair longer than one row of one");
    }

    #[test]
    fn order_is_a_function_of_seed_and_step() {
        let examples: Vec<Example> = (1..40).map(|l| ex(l % 9 + 2, 1)).collect();
        let a = DataOrder::new(&examples, 2, 16, 3, 7);
        let b = DataOrder::new(&examples, 2, 16, 3, 7);
        for s in 0..3 * a.steps_per_epoch() {
            assert_eq!(a.step(s), b.step(s));
        }
        // Each epoch visits every micro-batch exactly once, in a different order.
        let epoch = |e: u64| -> Vec<usize> {
            (0..a.steps_per_epoch()).flat_map(|k| a.step(e * a.steps_per_epoch() + k)).collect()
        };
        let (e0, e1) = (epoch(0), epoch(1));
        assert_eq!(e0.len(), a.micro_batches.len());
        assert_ne!(e0, e1);
        let mut sorted0 = e0.clone();
        let mut sorted1 = e1.clone();
        sorted0.sort();
        sorted1.sort();
        assert_eq!(sorted0, sorted1);
    }
}

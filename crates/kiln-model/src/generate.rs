//! Greedy decoding by re-running the full forward pass at every step: no cache, so it is
//! the plain reference that a KV-cache generator must agree with, and quick enough for
//! short answers on small models.

use crate::{Activations, Batch, Model};
use kiln_core::{Backend, FrozenWeights};

/// Continues every prompt greedily until it emits a token of `stop` or has `max_new`
/// new tokens; returns the new tokens (without the stop token).
pub fn greedy<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    prompts: &[Vec<i32>],
    max_new: usize,
    stop: &[i32],
) -> Vec<Vec<i32>> {
    let rows = prompts.len();
    if rows == 0 {
        return Vec::new();
    }
    let _frozen = FrozenWeights::new(b);
    let seq = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_new;
    let vocab = model.whole_config().vocab_size;
    let mut acts = Activations::new(b, &model.config, rows, seq, false, false);
    let mut seqs: Vec<Vec<i32>> = prompts.to_vec();
    let mut done = vec![false; rows];
    let mut out = vec![Vec::new(); rows];
    for _ in 0..max_new {
        // Right padding leaves every row's real positions unchanged under causal attention.
        let mut batch = Batch::padding(rows, seq);
        for (r, s) in seqs.iter().enumerate() {
            for (t, &id) in s.iter().enumerate() {
                let i = r * seq + t;
                (batch.ids[i], batch.positions[i], batch.segments[i]) = (id, t as i32, 0);
            }
        }
        model.forward(b, &mut acts, &batch);
        let logits = model.whole_logits(b, b.read(&acts.logits), rows * seq);
        for r in 0..rows {
            if done[r] {
                continue;
            }
            let last = r * seq + seqs[r].len() - 1;
            let row = &logits[last * vocab..(last + 1) * vocab];
            let next = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
                .0 as i32;
            if stop.contains(&next) {
                done[r] = true;
            } else {
                out[r].push(next);
                seqs[r].push(next);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    out
}

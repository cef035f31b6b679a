//! A batch of token rows as the model consumes it.

/// `rows × seq` tokens, row-major. Packed rows hold several sequences, told apart by
/// `segments` (attention never crosses a segment) with `positions` restarting in each.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq: usize,
    pub ids: Vec<i32>,
    pub positions: Vec<i32>,
    pub segments: Vec<i32>,
    /// Next-token target of each position; negative where there is none.
    pub targets: Vec<i32>,
    /// Loss weight of each position: the loss is `Σ weight · nll`.
    pub weights: Vec<f32>,
}

impl Batch {
    /// `rows × seq` tokens of padding: no segment, no target, no weight.
    pub fn padding(rows: usize, seq: usize) -> Self {
        let n = rows * seq;
        Self {
            rows,
            seq,
            ids: vec![0; n],
            positions: vec![0; n],
            segments: vec![-1; n],
            targets: vec![-1; n],
            weights: vec![0.0; n],
        }
    }

    /// One sequence per row, right-padded to the longest; every next-token prediction is a
    /// target and the loss is their mean (as transformers' causal-LM loss).
    pub fn causal_lm(sequences: &[Vec<i32>]) -> Self {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Self::padding(sequences.len(), seq);
        for (r, s) in sequences.iter().enumerate() {
            for (t, &id) in s.iter().enumerate() {
                let i = r * seq + t;
                batch.ids[i] = id;
                batch.positions[i] = t as i32;
                batch.segments[i] = 0;
                if let Some(&next) = s.get(t + 1) {
                    batch.targets[i] = next;
                }
            }
        }
        let count = batch.targets.iter().filter(|&&t| t >= 0).count();
        for (w, &t) in batch.weights.iter_mut().zip(&batch.targets) {
            *w = if t >= 0 { 1.0 / count as f32 } else { 0.0 };
        }
        batch
    }

    /// One row of `seq` tokens per completion (`(prompt + completion ids, prompt length)`),
    /// with targets of weight `weight` on the completion tokens only: the batches of RL and
    /// distillation, and of rescoring what the generator sampled.
    pub fn completions(sequences: &[(Vec<i32>, usize)], seq: usize, weight: f32) -> Self {
        let mut batch = Self::padding(sequences.len(), seq);
        for (r, (ids, prompt_len)) in sequences.iter().enumerate() {
            for (p, &id) in ids.iter().enumerate() {
                let i = r * seq + p;
                (batch.ids[i], batch.positions[i], batch.segments[i]) = (id, p as i32, 0);
                if p + 1 < ids.len() && p + 1 >= *prompt_len {
                    batch.targets[i] = ids[p + 1];
                    batch.weights[i] = weight;
                }
            }
        }
        batch
    }

    pub fn tokens(&self) -> usize {
        self.rows * self.seq
    }

    /// The rows `rows`, then padding up to `padded` rows.
    pub fn rows_padded(&self, rows: std::ops::Range<usize>, padded: usize) -> Self {
        let mut out = Self::padding(padded, self.seq);
        let (at, n) = (rows.start * self.seq..rows.end * self.seq, rows.len() * self.seq);
        out.ids[..n].copy_from_slice(&self.ids[at.clone()]);
        out.positions[..n].copy_from_slice(&self.positions[at.clone()]);
        out.segments[..n].copy_from_slice(&self.segments[at.clone()]);
        out.targets[..n].copy_from_slice(&self.targets[at.clone()]);
        out.weights[..n].copy_from_slice(&self.weights[at]);
        out
    }
}

//! DeepSeek-V3's sequence-wise balance loss (V3 report, eqs. 17-20), an optional complement
//! to the aux-loss-free bias. For each sequence S of T tokens, N experts and top-k K:
//!
//!   s'_{i,t} = s_{i,t} / Σ_j s_{j,t}               (s = σ(router logits))
//!   f_i = N / (K·T) · #{t ∈ S : i chosen at t}       P_i = (1/T) Σ_t s'_{i,t}
//!   L = α Σ_S W_S Σ_i f_i P_i
//!
//! W_S sums the sequence's per-token loss weights, so L is a token-weighted mean over the
//! sequences of the whole step, and grad accumulation and padding need no special case.
//! f is a count and gets no gradient; with g_i = α W_S f_i / T = ∂L/∂s'_{i,t}:
//!
//!   ∂L/∂s_{j,t} = (g_j − Σ_i g_i s'_{i,t}) / Σ_k s_{k,t},   ∂L/∂z = ∂L/∂s · s(1 − s)

use std::collections::BTreeMap;

/// Which sequence each token belongs to (negative: none, e.g. padding) and its loss weight.
pub struct SeqAux<'a> {
    pub alpha: f32,
    pub sequence: &'a [i64],
    pub weights: &'a [f32],
}

/// Returns L for `[tokens, experts]` sigmoid `scores` and `[tokens, top_k]` chosen `indices`,
/// and adds ∂L/∂logits into `dlogits`.
pub fn seq_aux_loss(scores: &[f32], indices: &[i32], top_k: usize, aux: &SeqAux, dlogits: &mut [f32]) -> f64 {
    let tokens = aux.sequence.len();
    let experts = scores.len() / tokens;
    let mut members: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (t, &s) in aux.sequence.iter().enumerate().filter(|(_, &s)| s >= 0) {
        members.entry(s).or_default().push(t);
    }
    let mut loss = 0.0;
    for tokens_of_seq in members.values() {
        let t_len = tokens_of_seq.len() as f64;
        let weight: f64 = tokens_of_seq.iter().map(|&t| aux.weights[t] as f64).sum();
        let mut counts = vec![0.0f64; experts];
        let mut p = vec![0.0f64; experts];
        for &t in tokens_of_seq {
            indices[t * top_k..(t + 1) * top_k].iter().for_each(|&i| counts[i as usize] += 1.0);
            let row = &scores[t * experts..(t + 1) * experts];
            let sum: f64 = row.iter().map(|&s| s as f64).sum();
            row.iter().zip(&mut p).for_each(|(&s, p)| *p += s as f64 / sum / t_len);
        }
        let f: Vec<f64> = counts.iter().map(|c| experts as f64 / (top_k as f64 * t_len) * c).collect();
        loss += aux.alpha as f64 * weight * f.iter().zip(&p).map(|(f, p)| f * p).sum::<f64>();
        let g: Vec<f64> = f.iter().map(|f| aux.alpha as f64 * weight * f / t_len).collect();
        for &t in tokens_of_seq {
            let row = &scores[t * experts..(t + 1) * experts];
            let sum: f64 = row.iter().map(|&s| s as f64).sum();
            let mean_g: f64 = row.iter().zip(&g).map(|(&s, g)| g * s as f64 / sum).sum();
            for (j, (&s, d)) in row.iter().zip(&mut dlogits[t * experts..(t + 1) * experts]).enumerate() {
                let s = s as f64;
                *d += ((g[j] - mean_g) / sum * s * (1.0 - s)) as f32;
            }
        }
    }
    loss
}

//! Softmax cross-entropy fused with a per-token loss weight.
//!
//! Per row with target t:  lse = log Σ_j exp(z_j),  nll = lse − z_t
//! Loss = Σ_rows weight·nll, so  dz_j = weight·(softmax(z)_j − [j = t]).
//! Rows with a negative target contribute nothing.

use super::fast_exp::fast_exp;
use rayon::prelude::*;

fn log_sum_exp(z: &[f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|&v| fast_exp(v - max)).sum();
    max + sum.ln()
}

fn target(t: i32, vocab: usize) -> Option<usize> {
    if t < 0 {
        return None;
    }
    assert!((t as usize) < vocab, "cross_entropy: target {t} outside the vocabulary of {vocab}");
    Some(t as usize)
}

pub fn forward(nll: &mut [f32], logits: &[f32], targets: &[i32], vocab: usize) {
    assert!(logits.len() == nll.len() * vocab && targets.len() == nll.len(), "cross_entropy_forward: shape mismatch");
    nll.par_iter_mut().zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((nll, z), &t)| {
        *nll = target(t, vocab).map_or(0.0, |t| log_sum_exp(z) - z[t]);
    });
}

pub fn backward(logits: &mut [f32], nll: &mut [f32], targets: &[i32], weights: &[f32], vocab: usize) {
    let rows = nll.len();
    assert!(
        logits.len() == rows * vocab && targets.len() == rows && weights.len() == rows,
        "cross_entropy_backward: shape mismatch"
    );
    logits.par_chunks_mut(vocab).zip(nll.par_iter_mut()).zip(targets.par_iter().zip(weights.par_iter())).for_each(
        |((z, nll), (&t, &w))| {
            let Some(t) = target(t, vocab) else {
                *nll = 0.0;
                z.fill(0.0);
                return;
            };
            let lse = log_sum_exp(z);
            *nll = lse - z[t];
            z.iter_mut().for_each(|v| *v = w * fast_exp(*v - lse));
            z[t] -= w;
        },
    );
}

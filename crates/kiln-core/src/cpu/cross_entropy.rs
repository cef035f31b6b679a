//! Softmax cross-entropy fused with a per-token loss weight, and the token accuracy.
//!
//! Per row with target t:  lse = log Σ_j exp(z_j),  nll = lse − z_t,  correct = [z_t = max z]
//! Loss = Σ_rows weight·nll, so  dz_j = weight·(softmax(z)_j − [j = t]).
//! Rows with a negative target contribute nothing.

use crate::fast_exp::fast_exp;
use crate::reduce;
use rayon::prelude::*;

/// The row's largest value and `log Σ_j exp(z_j)`.
fn max_log_sum_exp(z: &[f32]) -> (f32, f32) {
    let max = reduce::max(z);
    let sum: f32 = z.iter().map(|&v| fast_exp(v - max)).sum();
    (max, max + sum.ln())
}

fn target(t: i32, vocab: usize) -> Option<usize> {
    if t < 0 {
        return None;
    }
    assert!((t as usize) < vocab, "cross_entropy: target {t} outside the vocabulary of {vocab}");
    Some(t as usize)
}

pub fn forward(nll: &mut [f32], correct: &mut [f32], logits: &[f32], targets: &[i32], vocab: usize) {
    let rows = nll.len();
    assert!(
        logits.len() == rows * vocab && targets.len() == rows && correct.len() == rows,
        "cross_entropy_forward: shape mismatch"
    );
    nll.par_iter_mut().zip(correct.par_iter_mut()).zip(logits.par_chunks(vocab).zip(targets.par_iter())).for_each(
        |((nll, correct), (z, &t))| {
            (*nll, *correct) = target(t, vocab).map_or((0.0, 0.0), |t| {
                let (max, lse) = max_log_sum_exp(z);
                (lse - z[t], f32::from(u8::from(z[t] >= max)))
            });
        },
    );
}

pub fn backward(
    logits: &mut [f32],
    nll: &mut [f32],
    correct: &mut [f32],
    targets: &[i32],
    weights: &[f32],
    vocab: usize,
) {
    let rows = nll.len();
    assert!(
        logits.len() == rows * vocab && targets.len() == rows && weights.len() == rows && correct.len() == rows,
        "cross_entropy_backward: shape mismatch"
    );
    let out = nll.par_iter_mut().zip(correct.par_iter_mut());
    logits.par_chunks_mut(vocab).zip(out).zip(targets.par_iter().zip(weights.par_iter())).for_each(
        |((z, (nll, correct)), (&t, &w))| {
            let Some(t) = target(t, vocab) else {
                (*nll, *correct) = (0.0, 0.0);
                z.fill(0.0);
                return;
            };
            let (max, lse) = max_log_sum_exp(z);
            (*nll, *correct) = (lse - z[t], f32::from(u8::from(z[t] >= max)));
            z.iter_mut().for_each(|v| *v = w * fast_exp(*v - lse));
            z[t] -= w;
        },
    );
}

//! Reverse KL of distillation over the full vocabulary, fused with its gradient.
//!
//! Per row with student logits z and teacher logits y:
//!   log p = z − lse(z),  log q = y − lse(y),  KL = Σ_v p_v (log p_v − log q_v)
//!   ∂KL/∂z_v = p_v (log p_v − log q_v − KL)
//! Loss = Σ_rows weight·KL, so the logits are overwritten with weight·∂KL/∂z. Sums run in
//! f64: KL is a small difference of large terms.

use rayon::prelude::*;

/// `x − log Σ exp(x)` of one row, in f64.
fn log_softmax(x: &[f32], out: &mut [f64]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = v as f64 - lse);
}

pub fn backward(logits: &mut [f32], kl: &mut [f32], teacher: &[f32], weights: &[f32], vocab: usize) {
    let rows = kl.len();
    assert!(
        logits.len() == rows * vocab && teacher.len() == rows * vocab && weights.len() == rows,
        "reverse_kl_backward: shape mismatch"
    );
    logits
        .par_chunks_mut(vocab)
        .zip(teacher.par_chunks(vocab))
        .zip(kl.par_iter_mut().zip(weights.par_iter()))
        .for_each_init(
            || (vec![0f64; vocab], vec![0f64; vocab]),
            |(log_p, log_q), ((z, y), (kl, &w))| {
                log_softmax(z, log_p);
                log_softmax(y, log_q);
                let divergence: f64 = log_p.iter().zip(log_q.iter()).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
                *kl = divergence as f32;
                let w = w as f64;
                z.iter_mut()
                    .zip(log_p.iter().zip(log_q.iter()))
                    .for_each(|(g, (lp, lq))| *g = (w * lp.exp() * (lp - lq - divergence)) as f32);
            },
        );
}

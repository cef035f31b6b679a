//! The losses over one block of the vocabulary (vocabulary parallel: each rank of a tensor
//! group holds `vocab` columns of every row of logits, from the vocabulary's `first`).
//!
//! A row's softmax needs the whole row's log Σ exp, which the blocks combine from their
//! statistics (max m_b, log Σ_{j∈b} exp(z_j − m_b)); given it back (`lse`, as the sum of two
//! f32 values carrying f64's precision), each block finishes its own columns:
//!
//!   cross-entropy, target t:  nll = lse − z_t,   dz_j = w·(exp(z_j − lse) − [j = t])
//!   reverse KL, teacher y:    log p = z − lse_z,  log q = y − lse_y,
//!                             KL = Σ_blocks Σ_{v∈b} p_v (log p_v − log q_v),
//!                             dz_v = w·p_v (log p_v − log q_v − KL)

use crate::fast_exp::fast_exp;
use crate::reduce;
use rayon::prelude::*;

/// The block's column of target `t`, if it holds it.
fn column(t: i32, vocab: usize, first: usize) -> Option<usize> {
    usize::try_from(t).ok().and_then(|t| t.checked_sub(first)).filter(|&j| j < vocab)
}

/// A row's log Σ exp given as two values (`lse[0] + lse[1]`), in f64.
fn whole(lse: &[f32]) -> f64 {
    lse[0] as f64 + lse[1] as f64
}

pub fn stats(stats: &mut [f32], logits: &[f32], targets: &[i32], vocab: usize, first: usize) {
    let rows = targets.len();
    assert!(
        logits.len() == rows * vocab && stats.len() == rows * 3,
        "vocab_block_stats: shape mismatch ({rows} rows of {vocab}, {} logits, {} stats)",
        logits.len(),
        stats.len()
    );
    stats.par_chunks_mut(3).zip(logits.par_chunks(vocab).zip(targets.par_iter())).for_each(|(s, (z, &t))| {
        let max = reduce::max(z);
        let sum: f32 = z.iter().map(|&v| fast_exp(v - max)).sum();
        s.copy_from_slice(&[max, sum.ln(), column(t, vocab, first).map_or(0.0, |j| z[j])]);
    });
}

pub fn cross_entropy_backward(
    logits: &mut [f32],
    lse: &[f32],
    targets: &[i32],
    weights: &[f32],
    vocab: usize,
    first: usize,
) {
    let rows = targets.len();
    assert!(
        logits.len() == rows * vocab && lse.len() == rows * 2 && weights.len() == rows,
        "cross_entropy_block_backward: shape mismatch"
    );
    logits.par_chunks_mut(vocab).zip(lse.par_chunks(2)).zip(targets.par_iter().zip(weights.par_iter())).for_each(
        |((z, lse), (&t, &w))| {
            if t < 0 {
                z.fill(0.0);
                return;
            }
            let lse = whole(lse);
            z.iter_mut().for_each(|v| *v = w * fast_exp((*v as f64 - lse) as f32));
            if let Some(j) = column(t, vocab, first) {
                z[j] -= w;
            }
        },
    );
}

/// `(log p_v, log q_v)` of a row's column, in f64.
fn log_probs(z: f32, y: f32, lse: &[f32]) -> (f64, f64) {
    (z as f64 - whole(&lse[..2]), y as f64 - whole(&lse[2..]))
}

pub fn reverse_kl_forward(kl: &mut [f32], logits: &[f32], teacher: &[f32], lse: &[f32], vocab: usize) {
    let rows = kl.len();
    assert!(
        logits.len() == rows * vocab && teacher.len() == rows * vocab && lse.len() == rows * 4,
        "reverse_kl_block_forward: shape mismatch"
    );
    kl.par_iter_mut().zip(logits.par_chunks(vocab).zip(teacher.par_chunks(vocab))).zip(lse.par_chunks(4)).for_each(
        |((kl, (z, y)), lse)| {
            let part: f64 = z
                .iter()
                .zip(y)
                .map(|(&z, &y)| {
                    let (lp, lq) = log_probs(z, y, lse);
                    lp.exp() * (lp - lq)
                })
                .sum();
            *kl = part as f32;
        },
    );
}

pub fn reverse_kl_backward(
    logits: &mut [f32],
    teacher: &[f32],
    lse: &[f32],
    kl: &[f32],
    weights: &[f32],
    vocab: usize,
) {
    let rows = kl.len();
    assert!(
        logits.len() == rows * vocab && teacher.len() == rows * vocab && lse.len() == rows * 4 && weights.len() == rows,
        "reverse_kl_block_backward: shape mismatch"
    );
    logits
        .par_chunks_mut(vocab)
        .zip(teacher.par_chunks(vocab))
        .zip(lse.par_chunks(4).zip(kl.par_iter().zip(weights.par_iter())))
        .for_each(|((z, y), (lse, (&kl, &w)))| {
            let (kl, w) = (kl as f64, w as f64);
            z.iter_mut().zip(y).for_each(|(g, &y)| {
                let (lp, lq) = log_probs(*g, y, lse);
                *g = (w * lp.exp() * (lp - lq - kl)) as f32;
            });
        });
}

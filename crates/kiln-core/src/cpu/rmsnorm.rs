//! RMSNorm, optionally fused with the residual add that precedes it.
//!
//! Forward:  r = 1/√(mean(x²) + ε),  y = x·r·w
//! Backward: with g = dy·w,
//!   dx = r·g − x·r³·(Σ g·x)/D
//!   dw = Σ_rows dy·x·r

use rayon::prelude::*;

#[inline]
fn normalise_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
    r
}

pub fn forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(y.len() == x.len() && x.len() == rstd.len() * d, "rmsnorm_forward: shape mismatch");
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((y, x), r)| *r = normalise_row(y, x, w, eps));
}

pub fn add_forward(x: &mut [f32], delta: &[f32], y: &mut [f32], rstd: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(
        y.len() == x.len() && delta.len() == x.len() && x.len() == rstd.len() * d,
        "add_rmsnorm_forward: shape mismatch"
    );
    y.par_chunks_mut(d).zip(x.par_chunks_mut(d)).zip(delta.par_chunks(d).zip(rstd.par_iter_mut())).for_each(
        |((y, x), (delta, r))| {
            x.iter_mut().zip(delta).for_each(|(x, d)| *x += d);
            *r = normalise_row(y, x, w, eps);
        },
    );
}

pub fn backward(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32]) {
    let d = w.len();
    let rows = rstd.len();
    assert!(dx.len() == rows * d && dy.len() == rows * d && x.len() == rows * d && dw.len() == d);
    // Each task owns a block of rows and a private dw partial sum, reduced at the end.
    let rows_per_task = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(rows_per_task * d)
        .zip(dy.par_chunks(rows_per_task * d))
        .zip(x.par_chunks(rows_per_task * d).zip(rstd.par_chunks(rows_per_task)))
        .map(|((dx, dy), (x, rstd))| {
            let mut dw_part = vec![0.0f32; d];
            for (((dx, dy), x), &r) in dx.chunks_mut(d).zip(dy.chunks(d)).zip(x.chunks(d)).zip(rstd) {
                let dot: f32 = dy.iter().zip(w).zip(x).map(|((dy, w), x)| dy * w * x).sum();
                let c = r * r * r * dot / d as f32;
                for i in 0..d {
                    dx[i] += r * dy[i] * w[i] - c * x[i];
                    dw_part[i] += dy[i] * x[i] * r;
                }
            }
            dw_part
        })
        .collect();
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
}

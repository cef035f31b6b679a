//! AdamW, step for step as `torch.optim.AdamW` (non-fused, non-amsgrad):
//!   p ← p·(1 − lr·λ)
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
//!   p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)

use super::elementwise::CHUNK;
use crate::backend::AdamW;
use rayon::prelude::*;

pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let n = param.len();
    assert!(grad.len() == n && m.len() == n && v.len() == n, "adamw: buffer sizes differ");
    assert!(hp.step >= 1, "adamw: step counts from 1");
    let t = hp.step as i32;
    let step_size = hp.lr / (1.0 - hp.beta1.powi(t));
    let bc2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt();
    let decay = 1.0 - hp.lr * hp.weight_decay;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g[i];
                v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + hp.eps;
                p[i] = p[i] * decay - step_size * m[i] / denom;
            }
        });
}

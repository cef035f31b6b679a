//! DeepSeek-V4's hyper-connection mixing weights: forward against an f64 reference of
//! [`HyperConnection`]'s formulas, backward (mixes, bias, scales) against central differences,
//! for 2 and 4 streams and the head's form.

use super::{assert_close, check_gradient, weighted_sum};
use crate::backend::{Backend, HyperConnection};
use crate::rng::Rng;

/// The weights of one token, in f64.
fn reference_token(m: &[f32], base: &[f32], scale: &[f32], spec: &HyperConnection) -> Vec<f64> {
    let n = spec.streams;
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let part = |j: usize| if spec.head { 0 } else { (j / n).min(2) };
    let z: Vec<f64> = (0..spec.width()).map(|j| m[j] as f64 * scale[part(j)] as f64 + base[j] as f64).collect();
    let eps = spec.eps as f64;
    let mut out: Vec<f64> = (0..if spec.head { n } else { 2 * n })
        .map(|j| if part(j) == 0 { sigmoid(z[j]) + eps } else { 2.0 * sigmoid(z[j]) })
        .collect();
    if spec.head {
        return out;
    }
    let mut x: Vec<f64> = z[2 * n..].to_vec();
    for row in x.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum + eps);
    }
    for step in 0..2 * spec.iters - 1 {
        let columns = step % 2 == 0;
        for a in 0..n {
            let at = |b: usize| if columns { b * n + a } else { a * n + b };
            let sum: f64 = (0..n).map(|b| x[at(b)]).sum::<f64>() + eps;
            (0..n).for_each(|b| x[at(b)] /= sum);
        }
    }
    out.extend(x);
    out
}

pub fn hyper_connection<B: Backend>(b: &B) {
    let mut rng = Rng::new(31);
    for (streams, head) in [(2, false), (4, false), (4, true)] {
        let spec = HyperConnection { tokens: 3, streams, iters: 6, eps: 1e-6, head };
        let w = spec.width();
        let mixes = rng.normal_vec(spec.tokens * w, 1.0);
        let base = rng.normal_vec(w, 0.5);
        let scale: Vec<f32> = (0..spec.scales()).map(|i| 0.6 + 0.4 * i as f32).collect();
        let forward = |m: &[f32], bias: &[f32], s: &[f32]| {
            let mut out = b.zeros(m.len());
            b.hc_weights_forward(&mut out, &b.upload(m), &b.upload(bias), &b.upload(s), spec);
            b.read(&out)
        };
        let want: Vec<f64> = mixes.chunks_exact(w).flat_map(|m| reference_token(m, &base, &scale, &spec)).collect();
        let what = format!("hc_weights {streams} streams{}", if head { ", head" } else { "" });
        assert_close(&format!("{what} forward"), &forward(&mixes, &base, &scale), &want, 1e-6, 1e-5);

        let dout = rng.normal_vec(mixes.len(), 1.0);
        let (mut dmixes, mut dbase, mut dscale) =
            (b.zeros(mixes.len()), b.upload(&vec![0.25; w]), b.zeros(scale.len()));
        let (m, bias, s) = (b.upload(&mixes), b.upload(&base), b.upload(&scale));
        b.hc_weights_backward(&mut dmixes, &mut dbase, &mut dscale, &b.upload(&dout), &m, &bias, &s, spec);
        // dbase accumulates onto what it held (0.25 each).
        let dbase: Vec<f32> = b.read(&dbase).iter().map(|v| v - 0.25).collect();
        check_gradient(&format!("{what} dmixes"), &mixes, &b.read(&dmixes), 40, |x| {
            weighted_sum(&forward(x, &base, &scale), &dout)
        });
        check_gradient(&format!("{what} dbase"), &base, &dbase, 40, |x| {
            weighted_sum(&forward(&mixes, x, &scale), &dout)
        });
        check_gradient(&format!("{what} dscale"), &scale, &b.read(&dscale), 3, |x| {
            weighted_sum(&forward(&mixes, &base, x), &dout)
        });
    }
}

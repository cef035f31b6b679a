//! DeepSeek-V4's hyper-connection mixing weights ([`crate::HyperConnection`]), per token.
//!
//! Backward, with z the pre-activations (m·s + b) and ′ the gradient:
//!   pre  = σ(z) + ε          z′ = pre′·σ(z)(1 − σ(z))
//!   post = 2σ(z)             z′ = post′·2σ(z)(1 − σ(z))
//!   P = softmax_rows(z), X₀ = P + ε, then each normalisation Y = X / (s + ε) with s the sums
//!   along its axis:  X′ᵢⱼ = Y′ᵢⱼ/(s + ε) − Σ_along(Y′ ⊙ X)/(s + ε)²;  then
//!   z′ᵢⱼ = Pᵢⱼ (P′ᵢⱼ − Σₖ P′ᵢₖ Pᵢₖ)
//!   m′ = z′·s,  b′ += z′,  s′ += Σ z′·m   (summed over tokens in order)

use crate::HyperConnection;
use rayon::prelude::*;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The part (0: pre, 1: post, 2: comb) value `j` of a token's row belongs to.
fn part(j: usize, spec: &HyperConnection) -> usize {
    if spec.head {
        0
    } else {
        (j / spec.streams).min(2)
    }
}

/// An n × n matrix divided by its column sums (`columns`) or row sums (+ ε).
fn normalise(x: &mut [f32], n: usize, columns: bool, eps: f32) {
    for a in 0..n {
        let at = |b: usize| if columns { b * n + a } else { a * n + b };
        let sum: f32 = (0..n).map(|b| x[at(b)]).sum::<f32>() + eps;
        (0..n).for_each(|b| x[at(b)] /= sum);
    }
}

/// The comb matrix's states: the softmax P, then the input of every normalisation and the
/// final result (2·iters + 1 matrices after P).
fn comb_states(z: &[f32], spec: &HyperConnection) -> Vec<Vec<f32>> {
    let n = spec.streams;
    let mut p = z.to_vec();
    for row in p.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= sum);
    }
    let mut x: Vec<f32> = p.iter().map(|v| v + spec.eps).collect();
    let mut states = vec![p, x.clone()];
    for step in 0..2 * spec.iters - 1 {
        // Columns first, then rows and columns in turn.
        normalise(&mut x, n, step % 2 == 0, spec.eps);
        states.push(x.clone());
    }
    states
}

/// The pre-activations z = m·s + b of a token.
fn preactivations(m: &[f32], base: &[f32], scale: &[f32], spec: &HyperConnection) -> Vec<f32> {
    m.iter().zip(base).enumerate().map(|(j, (&m, &b))| m * scale[part(j, spec)] + b).collect()
}

fn forward_token(out: &mut [f32], m: &[f32], base: &[f32], scale: &[f32], spec: &HyperConnection) {
    let z = preactivations(m, base, scale, spec);
    let n = spec.streams;
    for j in 0..if spec.head { n } else { 2 * n } {
        out[j] = match part(j, spec) {
            0 => sigmoid(z[j]) + spec.eps,
            _ => 2.0 * sigmoid(z[j]),
        };
    }
    if !spec.head {
        out[2 * n..].copy_from_slice(comb_states(&z[2 * n..], spec).last().expect("states"));
    }
}

/// The gradient of a token's pre-activations from its output's gradient.
fn backward_token(dz: &mut [f32], dout: &[f32], m: &[f32], base: &[f32], scale: &[f32], spec: &HyperConnection) {
    let z = preactivations(m, base, scale, spec);
    let n = spec.streams;
    for j in 0..if spec.head { n } else { 2 * n } {
        let s = sigmoid(z[j]);
        dz[j] = dout[j] * if part(j, spec) == 0 { 1.0 } else { 2.0 } * s * (1.0 - s);
    }
    if spec.head {
        return;
    }
    let states = comb_states(&z[2 * n..], spec);
    let mut dy = dout[2 * n..].to_vec();
    // Back through the normalisations: state k + 1 is state k normalised (k ≥ 1).
    for k in (1..states.len() - 1).rev() {
        let (x, columns) = (&states[k], (k - 1) % 2 == 0);
        let mut dx = vec![0.0f32; n * n];
        for a in 0..n {
            let at = |b: usize| if columns { b * n + a } else { a * n + b };
            let sum: f32 = (0..n).map(|b| x[at(b)]).sum::<f32>() + spec.eps;
            let dot: f32 = (0..n).map(|b| dy[at(b)] * x[at(b)]).sum();
            (0..n).for_each(|b| dx[at(b)] = dy[at(b)] / sum - dot / (sum * sum));
        }
        dy = dx;
    }
    // X₀ = P + ε, then the softmax of each row.
    let p = &states[0];
    for (dz_row, (dp, p)) in dz[2 * n..].chunks_exact_mut(n).zip(dy.chunks_exact(n).zip(p.chunks_exact(n))) {
        let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
        for j in 0..n {
            dz_row[j] = p[j] * (dp[j] - dot);
        }
    }
}

pub fn forward(out: &mut [f32], mixes: &[f32], base: &[f32], scale: &[f32], spec: HyperConnection) {
    let w = spec.width();
    check(out.len(), mixes.len(), base.len(), scale.len(), &spec);
    out.par_chunks_mut(w).zip(mixes.par_chunks(w)).for_each(|(o, m)| forward_token(o, m, base, scale, &spec));
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dmixes: &mut [f32],
    dbase: &mut [f32],
    dscale: &mut [f32],
    dout: &[f32],
    mixes: &[f32],
    base: &[f32],
    scale: &[f32],
    spec: HyperConnection,
) {
    let w = spec.width();
    check(dout.len(), mixes.len(), base.len(), scale.len(), &spec);
    assert!(dmixes.len() == mixes.len() && dbase.len() == w && dscale.len() == spec.scales(), "hc_weights: shapes");
    // z′ per token into dmixes, then the sums over tokens in order, then m′ = z′·s.
    dmixes.par_chunks_mut(w).zip(dout.par_chunks(w).zip(mixes.par_chunks(w))).for_each(|(dz, (d, m))| {
        backward_token(dz, d, m, base, scale, &spec);
    });
    let (mut db, mut ds) = (vec![0.0f64; w], vec![0.0f64; spec.scales()]);
    for (dz, m) in dmixes.chunks_exact(w).zip(mixes.chunks_exact(w)) {
        for j in 0..w {
            db[j] += dz[j] as f64;
            ds[part(j, &spec)] += dz[j] as f64 * m[j] as f64;
        }
    }
    dbase.iter_mut().zip(&db).for_each(|(d, s)| *d += *s as f32);
    dscale.iter_mut().zip(&ds).for_each(|(d, s)| *d += *s as f32);
    dmixes.par_chunks_mut(w).for_each(|dz| {
        for (j, v) in dz.iter_mut().enumerate() {
            *v *= scale[part(j, &spec)];
        }
    });
}

fn check(out: usize, mixes: usize, base: usize, scale: usize, spec: &HyperConnection) {
    let w = spec.width();
    assert!(
        out == spec.tokens * w && mixes == spec.tokens * w && base == w && scale == spec.scales(),
        "hc_weights: {out} outputs, {mixes} mixes, {base} biases, {scale} scales for {spec:?}"
    );
    assert!(spec.iters >= 1 && spec.streams >= 1, "hc_weights: {spec:?}");
}

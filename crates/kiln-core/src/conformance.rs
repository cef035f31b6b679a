//! The backend conformance suite.
//!
//! Every operation of [`Backend`] is checked against a plain reference loop (in f64) on
//! random inputs, and every backward against central finite differences of the forward.
//! A backend proves itself by instantiating [`conformance_tests!`]:
//!
//! ```ignore
//! kiln_core::conformance_tests!(kiln_core::Cpu);
//! ```
//!
//! A device that may be absent passes `optional` and an `Option` of the backend; each test
//! then passes without checking where it is `None` (the expression says why).

use crate::backend::{
    group_segment, shared_prefix, AdamW, Attention, Backend, ColumnCopy, DecodeAttention, FrozenWeights, GroupedMatmul,
    Heads, Matmul, Precision, Rope, Routing, Scoring,
};
use crate::bf16;
use crate::rng::Rng;

mod attention_bf16;
mod attention_sinks;
mod compressed;
mod hyper_connection;
pub use attention_bf16::attention_bf16;
pub use attention_sinks::attention_sinks;
pub use compressed::{indexer, pooling, sparse_attention};
pub use hyper_connection::hyper_connection;

/// Generates one `#[test]` per check for the backend expression given.
#[macro_export]
macro_rules! conformance_tests {
    (optional $backend:expr) => {
        $crate::conformance_tests!(@checks optional $backend);
    };
    ($backend:expr) => {
        $crate::conformance_tests!(@checks always $backend);
    };
    (@checks $when:ident $backend:expr) => {
        $crate::conformance_tests!(@tests $when $backend;
            matmul, frozen_weights, grouped_matmul, elementwise, copy_columns, scatter_rows, embedding, rmsnorm, add_rmsnorm, rope_half_split,
            rope_interleaved, attention_forward, attention_backward, attention_bf16, attention_sinks, sparse_attention, pooling, indexer, attention_decode, swiglu, cross_entropy, reverse_kl, vocab_blocks,
            moe_route, moe_dispatch, hyper_connection, adamw, slices);
    };
    (@tests always $backend:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::$check(&$backend);
            }
        )*
    };
    (@tests optional $backend:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                let Some(b) = $backend else { return };
                $crate::conformance::$check(&b);
            }
        )*
    };
}

fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs reference {}", got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, reference {w} (error {err:.3e})");
    }
}

/// Compares `analytic` with central differences of `loss` at `x`, at `probes` random indices.
fn check_gradient(what: &str, x: &[f32], analytic: &[f32], probes: usize, loss: impl FnMut(&[f32]) -> f64) {
    check_gradient_step(what, x, analytic, probes, 1e-2, loss);
}

/// `check_gradient` with relative step `step` (smaller for piecewise-smooth ops like routing,
/// whose selection must not flip within the step).
fn check_gradient_step(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    probes: usize,
    step: f32,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length mismatch");
    let mut rng = Rng::new(0xfd);
    let mut xp = x.to_vec();
    for _ in 0..probes.min(x.len()) {
        let i = rng.below(x.len());
        let h = step * (1.0 + x[i].abs());
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * h as f64);
        let err = (fd - analytic[i] as f64).abs();
        assert!(
            err <= 5e-3 + 2e-2 * fd.abs(),
            "{what}: d/dx[{i}] analytic {} vs finite difference {fd} (error {err:.3e})",
            analytic[i]
        );
    }
}

/// `Σ a·w` in f64: a scalar loss with random sensitivities `w`.
fn weighted_sum(a: &[f32], w: &[f32]) -> f64 {
    a.iter().zip(w).map(|(&a, &w)| a as f64 * w as f64).sum()
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A matrix product's input as the product sees it in `precision`.
fn input(x: f32, precision: Precision) -> f64 {
    match precision {
        Precision::F32 => x as f64,
        Precision::Bf16 => bf16::widen(bf16::round(x)) as f64,
    }
}

/// A product's reference sums (`want`, in f64 from the inputs in the product's precision) and
/// the magnitudes `Σ |terms|` of each; `got` must be within 1e-4 (absolute and relative) in
/// f32, and within the f32 summation bound `γ_k Σ |terms|` (see [`Precision::Bf16`]) in bf16,
/// where nothing else may err.
fn assert_product(what: &str, got: &[f32], want: &[f64], magnitude: &[f64], terms: usize, precision: Precision) {
    if precision == Precision::F32 {
        return assert_close(what, got, want, 1e-4, 1e-4);
    }
    // Sums that round to nearest err by 2⁻²⁴ per addition, truncating ones by 2⁻²³.
    let u = 2f64.powi(-23);
    let gamma = terms as f64 * u / (1.0 - terms as f64 * u);
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= gamma * m, "{what}[{i}]: got {g}, reference {w} (error {err:.3e}, bound {:.3e})", gamma * m);
    }
}

pub fn matmul<B: Backend>(b: &B) {
    let mut rng = Rng::new(1);
    let shapes = [(7, 5, 3, 1), (33, 70, 65, 1), (130, 96, 80, 1), (9, 11, 13, 3), (40, 100, 515, 1)];
    for precision in [Precision::F32, Precision::Bf16] {
        for &(m, n, k, batch) in &shapes {
            for (trans_a, trans_b, accumulate) in (0..8).map(|bits| (bits & 1 == 1, bits & 2 == 2, bits & 4 == 4)) {
                let spec = Matmul { m, n, k, trans_a, trans_b, batch, accumulate, precision, b_is_weight: false };
                let a = rng.normal_vec(batch * m * k, 1.0);
                let bm = rng.normal_vec(batch * k * n, 1.0);
                let c0 = rng.normal_vec(batch * m * n, 1.0);
                let (mut want, mut magnitude) = (vec![0.0f64; batch * m * n], vec![0.0f64; batch * m * n]);
                for p in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = if accumulate { c0[p * m * n + i * n + j] as f64 } else { 0.0 };
                            let mut size = s.abs();
                            for l in 0..k {
                                let av = if trans_a { a[p * m * k + l * m + i] } else { a[p * m * k + i * k + l] };
                                let bv = if trans_b { bm[p * k * n + j * k + l] } else { bm[p * k * n + l * n + j] };
                                let term = input(av, precision) * input(bv, precision);
                                s += term;
                                size += term.abs();
                            }
                            want[p * m * n + i * n + j] = s;
                            magnitude[p * m * n + i * n + j] = size;
                        }
                    }
                }
                let mut c = b.upload(&c0);
                b.matmul(&mut c, &b.upload(&a), &b.upload(&bm), spec);
                let terms = k + accumulate as usize;
                assert_product(&format!("matmul {spec:?}"), &b.read(&c), &want, &magnitude, terms, precision);
            }
        }
    }
}

/// Products by a frozen weight ([`Backend::freeze_weights`]) give the same bits however
/// often they run, and the product the same inputs give unfrozen: the same bits in bf16 (one
/// kernel either way, so a rollout's rows equal a training step's), within the rounding of a
/// k-term f32 sum in f32 (a backend may multiply a frozen f32 weight with a kernel of its own);
/// a weight changed after the thaw is seen by the next freeze, at the same address.
pub fn frozen_weights<B: Backend>(b: &B) {
    let mut rng = Rng::new(9);
    let (n, k) = (70, 65);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut w = b.upload(&rng.normal_vec(n * k, 1.0));
        let inputs: Vec<Vec<f32>> = [1, 64, 3].iter().map(|&m| rng.normal_vec(m * k, 1.0)).collect();
        let product = |w: &B::Slice, x: &[f32]| {
            let m = x.len() / k;
            let mut c = b.zeros(m * n);
            b.matmul(&mut c, &b.upload(x), w, Matmul::linear(m, k, n).in_precision(precision).of_weight());
            b.read(&c)
        };
        for round in 0..2 {
            let unfrozen: Vec<_> = inputs.iter().map(|x| product(&w, x)).collect();
            // Σ_l |x_il · w_jl| of each output, bounding the sums' rounding.
            let weights = b.read(&w);
            let magnitudes: Vec<Vec<f64>> = inputs
                .iter()
                .map(|x| {
                    let row =
                        |i: usize, j: usize| (0..k).map(|l| (x[i * k + l] * weights[j * k + l]).abs() as f64).sum();
                    (0..x.len() / k).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| row(i, j)).collect()
                })
                .collect();
            let u = 2f64.powi(-24);
            let gamma = k as f64 * u / (1.0 - k as f64 * u);
            let _frozen = FrozenWeights::new(b);
            let _nested = FrozenWeights::new(b);
            let first: Vec<_> = inputs.iter().map(|x| product(&w, x)).collect();
            for (i, ((got, want), magnitude)) in first.iter().zip(&unfrozen).zip(&magnitudes).enumerate() {
                let what = format!("{precision:?}, round {round}, input {i}");
                if precision == Precision::Bf16 {
                    assert_eq!(bits(got), bits(want), "{what}");
                }
                for (j, ((&g, &u), &m)) in got.iter().zip(want).zip(magnitude).enumerate() {
                    let err = (g as f64 - u as f64).abs();
                    assert!(err <= 2.0 * gamma * m, "{what}[{j}]: frozen {g}, unfrozen {u}");
                }
            }
            for (i, (x, first)) in inputs.iter().zip(&first).enumerate() {
                assert_eq!(bits(&product(&w, x)), bits(first), "{precision:?}, round {round}, input {i}, again");
            }
            drop((_nested, _frozen));
            b.scale(&mut w, -0.5);
        }
    }
}

pub fn grouped_matmul<B: Backend>(b: &B) {
    let mut rng = Rng::new(13);
    // Many groups (run side by side), few groups (one after another), empty groups.
    for precision in [Precision::F32, Precision::Bf16] {
        for rows in [vec![3, 0, 5, 1, 7, 0, 2, 4, 6], vec![40, 0, 33]] {
            let total: usize = rows.iter().sum();
            let (n, k) = (6, 5);
            for trans_b in [false, true] {
                for accumulate in [false, true] {
                    let spec = GroupedMatmul { n, k, trans_b, accumulate, precision };
                    let a = rng.normal_vec(total * k, 1.0);
                    let bm = rng.normal_vec(rows.len() * n * k, 1.0);
                    let c0 = rng.normal_vec(total * n, 1.0);
                    let at = |i: usize, l: usize| input(a[i * k + l], precision);
                    let bv = |g: usize, l: usize, j: usize| {
                        input(if trans_b { bm[g * n * k + j * k + l] } else { bm[g * n * k + l * n + j] }, precision)
                    };
                    let old = |x: f32| if accumulate { x as f64 } else { 0.0 };
                    let (mut want, mut magnitude) = (vec![0.0f64; total * n], vec![0.0f64; total * n]);
                    let mut first = 0;
                    for (g, &m) in rows.iter().enumerate() {
                        for i in first..first + m {
                            for j in 0..n {
                                let terms = (0..k).map(|l| at(i, l) * bv(g, l, j));
                                want[i * n + j] = old(c0[i * n + j]) + terms.clone().sum::<f64>();
                                magnitude[i * n + j] = old(c0[i * n + j]).abs() + terms.map(f64::abs).sum::<f64>();
                            }
                        }
                        first += m;
                    }
                    let mut c = b.upload(&c0);
                    b.grouped_matmul(&mut c, &b.upload(&a), &b.upload(&bm), &rows, spec);
                    let what = format!("grouped_matmul {spec:?} rows {rows:?}");
                    assert_product(&what, &b.read(&c), &want, &magnitude, k + accumulate as usize, precision);

                    // Weight gradient: dB_g += A_gᵀ·dC_g in B's layout.
                    let dc = rng.normal_vec(total * n, 1.0);
                    let db0 = rng.normal_vec(rows.len() * n * k, 1.0);
                    let (mut want, mut magnitude) =
                        (to_f64(&db0), db0.iter().map(|x| x.abs() as f64).collect::<Vec<_>>());
                    let mut first = 0;
                    for (g, &m) in rows.iter().enumerate() {
                        for l in 0..k {
                            for j in 0..n {
                                let terms = (first..first + m).map(|i| at(i, l) * input(dc[i * n + j], precision));
                                let to = if trans_b { g * n * k + j * k + l } else { g * n * k + l * n + j };
                                want[to] += terms.clone().sum::<f64>();
                                magnitude[to] += terms.map(f64::abs).sum::<f64>();
                            }
                        }
                        first += m;
                    }
                    let mut db = b.upload(&db0);
                    b.grouped_matmul_weight_grad(&mut db, &b.upload(&dc), &b.upload(&a), &rows, spec);
                    let what = format!("grouped_matmul_weight_grad {spec:?} rows {rows:?}");
                    let most_rows = rows.iter().max().unwrap() + 1;
                    assert_product(&what, &b.read(&db), &want, &magnitude, most_rows, precision);
                }
            }
        }
    }
}

pub fn copy_columns<B: Backend>(b: &B) {
    let mut rng = Rng::new(21);
    let (rows, src_stride, dst_stride) = (23, 11, 7);
    let src = rng.normal_vec(rows * src_stride, 1.0);
    let dst = rng.normal_vec(rows * dst_stride, 1.0);
    for accumulate in [false, true] {
        let spec = ColumnCopy { rows, cols: 4, src_stride, src_offset: 6, dst_stride, dst_offset: 2, accumulate };
        let mut got = b.upload(&dst);
        b.copy_columns(&mut got, &b.upload(&src), spec);
        let want: Vec<f64> = (0..rows * dst_stride)
            .map(|i| {
                let (r, c) = (i / dst_stride, i % dst_stride);
                let old = dst[i] as f64;
                if (2..6).contains(&c) {
                    let s = src[r * src_stride + 6 + c - 2] as f64;
                    if accumulate {
                        old + s
                    } else {
                        s
                    }
                } else {
                    old
                }
            })
            .collect();
        assert_close("copy_columns", &b.read(&got), &want, 1e-6, 1e-6);
    }
}

/// Rows written into an f32 buffer land exactly; into bf16 storage as the nearest bf16, two
/// values to a word (value `2i` in the low half of word `i`).
pub fn scatter_rows<B: Backend>(b: &B) {
    let mut rng = Rng::new(33);
    let dim = 6;
    let dst = rng.normal_vec(6 * dim, 1.0);
    let src = rng.normal_vec(3 * dim, 1.0);
    let rows = [4, -1, 0];
    let mut got = b.upload(&dst);
    b.scatter_rows(&mut got, &b.upload(&src), &b.upload_index(&rows), dim, Precision::F32);
    let mut want: Vec<f64> = dst.iter().map(|&x| x as f64).collect();
    for (t, &r) in rows.iter().enumerate().filter(|(_, &r)| r >= 0) {
        for c in 0..dim {
            want[r as usize * dim + c] = src[t * dim + c] as f64;
        }
    }
    assert_close("scatter_rows", &b.read(&got), &want, 0.0, 0.0);

    let mut packed = b.zeros(Precision::Bf16.words(6 * dim));
    b.scatter_rows(&mut packed, &b.upload(&src), &b.upload_index(&rows), dim, Precision::Bf16);
    let values: Vec<u16> =
        b.read(&packed).iter().flat_map(|w| [w.to_bits() as u16, (w.to_bits() >> 16) as u16]).collect();
    let mut want = vec![0u16; 6 * dim];
    for (t, &r) in rows.iter().enumerate().filter(|(_, &r)| r >= 0) {
        for c in 0..dim {
            want[r as usize * dim + c] = bf16::round(src[t * dim + c]);
        }
    }
    assert_eq!(values, want, "scatter_rows into bf16 storage");
}

pub fn elementwise<B: Backend>(b: &B) {
    let mut rng = Rng::new(2);
    let (rows, cols) = (37, 19);
    let x = rng.normal_vec(rows * cols, 1.0);
    let y = rng.normal_vec(rows * cols, 1.0);
    let bias = rng.normal_vec(cols, 1.0);

    let mut buf = b.upload(&x);
    b.add_assign(&mut buf, &b.upload(&y));
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| a as f64 + c as f64).collect();
    assert_close("add_assign", &b.read(&buf), &want, 1e-6, 1e-6);

    b.scale(&mut buf, -0.5);
    let want: Vec<f64> = want.iter().map(|v| v * -0.5).collect();
    assert_close("scale", &b.read(&buf), &want, 1e-6, 1e-6);

    let mut rounded = b.upload(&x);
    b.round_to_bf16(&mut rounded);
    let want: Vec<f64> = x.iter().map(|&v| bf16::widen(bf16::round(v)) as f64).collect();
    assert_close("round_to_bf16", &b.read(&rounded), &want, 0.0, 0.0);

    for nesterov in [true, false] {
        let (momentum, g) = (0.95, rng.normal_vec(rows * cols, 1.0));
        let (mut update, mut buf) = (b.zeros(x.len()), b.upload(&y));
        b.muon_momentum(&mut update, &mut buf, &b.upload(&g), momentum, nesterov);
        let (mu, g64) = (momentum, g.iter().map(|&v| v as f64));
        let want_buf: Vec<f64> =
            y.iter().zip(g64.clone()).map(|(&m, g)| m as f64 + (1.0 - mu) * (g - m as f64)).collect();
        let want: Vec<f64> = match nesterov {
            true => g64.zip(&want_buf).map(|(g, m)| g + mu * (m - g)).collect(),
            false => want_buf.clone(),
        };
        assert_close("muon_momentum buffer", &b.read(&buf), &want_buf, 1e-6, 1e-6);
        assert_close(&format!("muon_momentum update (nesterov {nesterov})"), &b.read(&update), &want, 1e-6, 1e-6);
    }

    let ss = b.sum_squares(&b.upload(&x));
    let want_ss: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    assert!((ss - want_ss).abs() < 1e-6 * want_ss, "sum_squares: {ss} vs {want_ss}");

    let mut buf = b.upload(&x);
    b.add_bias(&mut buf, &b.upload(&bias));
    let want: Vec<f64> = x.iter().enumerate().map(|(i, &v)| v as f64 + bias[i % cols] as f64).collect();
    assert_close("add_bias", &b.read(&buf), &want, 1e-6, 1e-6);

    let mut db = b.upload(&bias);
    b.bias_backward(&mut db, &b.upload(&y));
    let want: Vec<f64> =
        (0..cols).map(|j| bias[j] as f64 + (0..rows).map(|r| y[r * cols + j] as f64).sum::<f64>()).collect();
    assert_close("bias_backward", &b.read(&db), &want, 1e-5, 1e-5);

    let w = rng.normal_vec(rows, 1.0);
    let mut scaled = b.upload(&x);
    b.scale_rows(&mut scaled, &b.upload(&w));
    let want: Vec<f64> = x.iter().enumerate().map(|(i, &v)| v as f64 * w[i / cols] as f64).collect();
    assert_close("scale_rows", &b.read(&scaled), &want, 1e-6, 1e-6);

    let mut dots = b.zeros(rows);
    b.row_dot(&mut dots, &b.upload(&x), &b.upload(&y));
    let want: Vec<f64> =
        (0..rows).map(|r| (0..cols).map(|c| x[r * cols + c] as f64 * y[r * cols + c] as f64).sum()).collect();
    assert_close("row_dot", &b.read(&dots), &want, 1e-5, 1e-5);

    let mut f = b.upload(&x);
    b.fill(&mut f, 3.0);
    assert!(b.read(&f).iter().all(|&v| v == 3.0), "fill");
    b.copy(&mut f, &b.upload(&y));
    assert!(b.read(&f) == y, "copy");
}

pub fn embedding<B: Backend>(b: &B) {
    let mut rng = Rng::new(3);
    let (rows, dim) = (11, 6);
    let table = rng.normal_vec(rows * dim, 1.0);
    // −1: a token whose row another rank holds (vocabulary parallel) reads zeros, adds nothing.
    let ids: Vec<i32> = vec![3, 0, 10, -1, 3, 7, 3];
    let mut out = b.upload(&vec![f32::NAN; ids.len() * dim]);
    let idx = b.upload_index(&ids);
    b.embedding_forward(&mut out, &b.upload(&table), &idx, dim);
    let row = |i: i32| usize::try_from(i).map_or(vec![0.0; dim], |i| to_f64(&table[i * dim..(i + 1) * dim]));
    let want: Vec<f64> = ids.iter().flat_map(|&i| row(i)).collect();
    assert_close("embedding_forward", &b.read(&out), &want, 0.0, 0.0);

    let dout = rng.normal_vec(ids.len() * dim, 1.0);
    let mut dtable = b.upload(&table);
    b.embedding_backward(&mut dtable, &b.upload(&dout), &idx, dim);
    let mut want = to_f64(&table);
    for (t, i) in ids.iter().enumerate().filter_map(|(t, &i)| Some((t, usize::try_from(i).ok()?))) {
        for d in 0..dim {
            want[i * dim + d] += dout[t * dim + d] as f64;
        }
    }
    assert_close("embedding_backward", &b.read(&dtable), &want, 1e-6, 1e-6);
}

fn rmsnorm_reference(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(&v, &w)| v as f64 * r * w as f64)
        })
        .collect()
}

pub fn rmsnorm<B: Backend>(b: &B) {
    let mut rng = Rng::new(4);
    let (rows, d, eps) = (13, 24, 1e-5);
    let x = rng.normal_vec(rows * d, 1.0);
    let w = rng.normal_vec(d, 1.0);
    let g = rng.normal_vec(rows * d, 1.0);
    let forward = |x: &[f32], w: &[f32]| {
        let (mut y, mut rstd) = (b.zeros(rows * d), b.zeros(rows));
        b.rmsnorm_forward(&mut y, &mut rstd, &b.upload(x), &b.upload(w), eps);
        (y, rstd)
    };
    let (y, rstd) = forward(&x, &w);
    assert_close("rmsnorm_forward", &b.read(&y), &rmsnorm_reference(&x, &w, eps), 1e-5, 1e-5);

    // dx and dw accumulate: start them from known values and subtract after.
    let (dx0, dw0) = (rng.normal_vec(rows * d, 1.0), rng.normal_vec(d, 1.0));
    let (mut dx, mut dw) = (b.upload(&dx0), b.upload(&dw0));
    b.rmsnorm_backward(&mut dx, &mut dw, &b.upload(&g), &b.upload(&x), &b.upload(&w), &rstd);
    let dx: Vec<f32> = b.read(&dx).iter().zip(&dx0).map(|(a, b)| a - b).collect();
    let dw: Vec<f32> = b.read(&dw).iter().zip(&dw0).map(|(a, b)| a - b).collect();
    check_gradient("rmsnorm dx", &x, &dx, 80, |x| weighted_sum(&b.read(&forward(x, &w).0), &g));
    check_gradient("rmsnorm dw", &w, &dw, 24, |w| weighted_sum(&b.read(&forward(&x, w).0), &g));
}

pub fn add_rmsnorm<B: Backend>(b: &B) {
    let mut rng = Rng::new(5);
    let (rows, d, eps) = (9, 16, 1e-6);
    let x = rng.normal_vec(rows * d, 1.0);
    let delta = rng.normal_vec(rows * d, 1.0);
    let w = rng.normal_vec(d, 1.0);
    let (mut xs, mut y, mut rstd) = (b.upload(&x), b.zeros(rows * d), b.zeros(rows));
    b.add_rmsnorm_forward(&mut xs, &b.upload(&delta), &mut y, &mut rstd, &b.upload(&w), eps);
    let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
    assert_close("add_rmsnorm sum", &b.read(&xs), &to_f64(&sum), 1e-6, 1e-6);
    assert_close("add_rmsnorm y", &b.read(&y), &rmsnorm_reference(&sum, &w, eps), 1e-5, 1e-5);
}

/// Reference rotation of one `[tokens, heads, head_dim]` tensor.
fn rope_reference(x: &[f32], table: &[f32], pos: &[i32], spec: Rope) -> Vec<f64> {
    let (hd, rot, half) = (spec.x.head_dim, spec.rot_dim, spec.rot_dim / 2);
    let hd_off = spec.offset;
    let mut out = to_f64(x);
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..spec.x.heads {
            let base = (t * spec.x.heads + h) * hd;
            for i in 0..half {
                let (ia, ib) = if spec.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (ia, ib) = (ia + hd_off, ib + hd_off);
                let c = table[p as usize * rot + i] as f64;
                let s = table[p as usize * rot + half + i] as f64;
                let (a, bb) = (x[base + ia] as f64, x[base + ib] as f64);
                out[base + ia] = a * c - bb * s;
                out[base + ib] = bb * c + a * s;
            }
        }
    }
    out
}

fn rope<B: Backend>(b: &B, interleaved: bool, offset: usize) {
    let mut rng = Rng::new(6);
    let spec = Rope { x: Heads { tokens: 10, heads: 3, head_dim: 12 }, rot_dim: 8, offset, interleaved };
    let n = 10 * 3 * 12;
    let max_pos = 32;
    let table: Vec<f32> = (0..max_pos)
        .flat_map(|p| {
            let angles: Vec<f64> = (0..4).map(|i| p as f64 * 10000f64.powf(-(i as f64) / 4.0)).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
            [cos, sin].concat()
        })
        .collect();
    let pos: Vec<i32> = vec![0, 1, 2, 3, 0, 1, 5, 31, 7, 2];
    let x = rng.normal_vec(n, 1.0);
    let (tb, pi) = (b.upload(&table), b.upload_index(&pos));
    let mut y = b.upload(&x);
    b.rope_forward(&mut y, &tb, &pi, spec);
    assert_close("rope_forward", &b.read(&y), &rope_reference(&x, &table, &pos, spec), 1e-5, 1e-5);

    let g = rng.normal_vec(n, 1.0);
    let mut dx = b.upload(&g);
    b.rope_backward(&mut dx, &tb, &pi, spec);
    check_gradient("rope dx", &x, &b.read(&dx), 60, |x| {
        let mut y = b.upload(x);
        b.rope_forward(&mut y, &tb, &pi, spec);
        weighted_sum(&b.read(&y), &g)
    });
}

pub fn rope_half_split<B: Backend>(b: &B) {
    rope(b, false, 0);
    rope(b, false, 3);
}

pub fn rope_interleaved<B: Backend>(b: &B) {
    rope(b, true, 0);
    rope(b, true, 4);
}

/// Attention shapes that cross block boundaries, share kv heads and pack several sequences.
fn attention_cases() -> Vec<(Attention, Vec<i32>)> {
    let base = Attention {
        batch: 2,
        seq: 70,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 8,
        v_head_dim: 8,
        scale: 0.3,
        window: None,
        precision: Precision::F32,
    };
    let packed: Vec<i32> = (0..140)
        .map(|t| {
            if t % 70 < 30 {
                0
            } else if t % 70 < 66 {
                1
            } else {
                2
            }
        })
        .collect();
    // A prompt shared by three completions laid out after it, then a second prompt with two
    // completions, the last ending in padding.
    let shared: Vec<i32> = (0..140)
        .map(|t| match t % 70 {
            0..20 => shared_prefix(0),
            20..35 => group_segment(0, 0),
            35..41 => group_segment(0, 1),
            41..45 => group_segment(0, 2),
            45..52 => shared_prefix(1),
            52..58 => group_segment(1, 0),
            58..67 => group_segment(1, 1),
            _ => -1,
        })
        .collect();
    vec![
        (base, vec![0; 140]),
        (base, packed.clone()),
        (base, shared),
        (Attention { window: Some(20), ..base }, packed),
        (
            Attention {
                batch: 1,
                seq: 150,
                q_heads: 2,
                kv_heads: 1,
                head_dim: 4,
                v_head_dim: 4,
                scale: 0.5,
                window: None,
                precision: Precision::F32,
            },
            vec![7; 150],
        ),
        // Multi-head latent attention's shape: wider queries/keys than values.
        (
            Attention {
                batch: 1,
                seq: 80,
                q_heads: 3,
                kv_heads: 3,
                head_dim: 12,
                v_head_dim: 5,
                scale: 0.25,
                window: None,
                precision: Precision::F32,
            },
            vec![0; 80],
        ),
    ]
}

fn attention_reference(q: &[f32], k: &[f32], v: &[f32], seg: &[i32], s: Attention) -> Vec<f64> {
    let (hd, vd) = (s.head_dim, s.v_head_dim);
    let group = s.q_heads / s.kv_heads;
    let mut out = vec![0.0f64; s.tokens() * s.q_heads * vd];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq {
                let qi = ((b * s.seq + i) * s.q_heads + h) * hd;
                let (si, sj) = (seg[b * s.seq + i], |j: usize| seg[b * s.seq + j]);
                // The same segment, or the shared prefix (member 0xffff) of the query's group.
                let prefix_of_own_group = |j: usize| si >= 0 && sj(j) >> 16 == si >> 16 && sj(j) & 0xffff == 0xffff;
                let same = |j: usize| si == sj(j) || prefix_of_own_group(j);
                let allowed = |j: usize| j <= i && same(j) && s.window.is_none_or(|w| i - j < w);
                let kj = |j: usize| ((b * s.seq + j) * s.kv_heads + h / group) * hd;
                let vj = |j: usize| ((b * s.seq + j) * s.kv_heads + h / group) * vd;
                let oi = ((b * s.seq + i) * s.q_heads + h) * vd;
                let scores: Vec<f64> = (0..s.seq)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..hd).map(|d| q[qi + d] as f64 * k[kj(j) + d] as f64).sum::<f64>() * s.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - max).exp() / z;
                    if p > 0.0 {
                        for d in 0..vd {
                            out[oi + d] += p * v[vj(j) + d] as f64;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Elements of q, k and v.
fn attention_sizes(s: &Attention) -> (usize, usize, usize) {
    let n = s.tokens();
    (n * s.q_heads * s.head_dim, n * s.kv_heads * s.head_dim, n * s.kv_heads * s.v_head_dim)
}

fn attention_run<B: Backend>(b: &B, q: &[f32], k: &[f32], v: &[f32], seg: &B::Index, s: Attention) -> (B::Buf, B::Buf) {
    let (mut out, mut lse) = (b.zeros(s.tokens() * s.q_heads * s.v_head_dim), b.zeros(s.batch * s.q_heads * s.seq));
    b.attention_forward(&mut out, &mut lse, &b.upload(q), &b.upload(k), &b.upload(v), seg, s);
    (out, lse)
}

pub fn attention_forward<B: Backend>(b: &B) {
    let mut rng = Rng::new(7);
    for (s, seg) in attention_cases() {
        let (nq, nk, nv) = attention_sizes(&s);
        let (q, k, v) = (rng.normal_vec(nq, 1.0), rng.normal_vec(nk, 1.0), rng.normal_vec(nv, 1.0));
        let (out, _) = attention_run(b, &q, &k, &v, &b.upload_index(&seg), s);
        assert_close(
            &format!("attention_forward {s:?}"),
            &b.read(&out),
            &attention_reference(&q, &k, &v, &seg, s),
            1e-5,
            1e-4,
        );
    }
}

pub fn attention_backward<B: Backend>(b: &B) {
    let mut rng = Rng::new(8);
    for (s, seg) in attention_cases() {
        let (nq, nk, nv) = attention_sizes(&s);
        let (q, k, v) = (rng.normal_vec(nq, 1.0), rng.normal_vec(nk, 1.0), rng.normal_vec(nv, 1.0));
        let g = rng.normal_vec(s.tokens() * s.q_heads * s.v_head_dim, 1.0);
        let si = b.upload_index(&seg);
        let (out, lse) = attention_run(b, &q, &k, &v, &si, s);
        let (mut dq, mut dk, mut dv) = (b.upload(&q), b.upload(&k), b.upload(&v)); // overwritten
        let (qb, kb, vb) = (b.upload(&q), b.upload(&k), b.upload(&v));
        b.attention_backward(&mut dq, &mut dk, &mut dv, &b.upload(&g), &qb, &kb, &vb, &out, &lse, &si, s);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| weighted_sum(&b.read(&attention_run(b, q, k, v, &si, s).0), &g);
        let name = format!("attention {s:?}");
        check_gradient(&format!("{name} dq"), &q, &b.read(&dq), 40, |x| loss(x, &k, &v));
        check_gradient(&format!("{name} dk"), &k, &b.read(&dk), 40, |x| loss(&q, x, &v));
        check_gradient(&format!("{name} dv"), &v, &b.read(&dv), 40, |x| loss(&q, &k, x));
    }
}

/// Plain, and clamped as DeepSeek-V4's experts are (most gates and some ups beyond the limit).
pub fn swiglu<B: Backend>(b: &B) {
    let mut rng = Rng::new(9);
    let n = 300;
    for limit in [f32::INFINITY, 1.5] {
        // Away from the clamp's corners, where finite differences straddle them.
        let off_corner = |x: f32| if (x.abs() - limit).abs() < 0.15 { x + 0.3 * x.signum() } else { x };
        let gate: Vec<f32> = rng.normal_vec(n, 3.0).into_iter().map(off_corner).collect();
        let up: Vec<f32> = rng.normal_vec(n, 1.5).into_iter().map(off_corner).collect();
        let forward = |g: &[f32], u: &[f32]| {
            let mut h = b.zeros(n);
            b.swiglu_forward(&mut h, &b.upload(g), &b.upload(u), limit);
            b.read(&h)
        };
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let (g, u, l) = (g as f64, u as f64, limit as f64);
                let (g, u) = (g.min(l), u.clamp(-l, l));
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        assert!(limit.is_infinite() || gate.iter().filter(|&&g| g > limit).count() > n / 10);
        assert_close(&format!("swiglu_forward (limit {limit})"), &forward(&gate, &up), &want, 1e-6, 1e-5);

        let dh = rng.normal_vec(n, 1.0);
        let (mut dg, mut du) = (b.zeros(n), b.zeros(n));
        b.swiglu_backward(&mut dg, &mut du, &b.upload(&dh), &b.upload(&gate), &b.upload(&up), limit);
        check_gradient(&format!("swiglu dgate (limit {limit})"), &gate, &b.read(&dg), 100, |g| {
            weighted_sum(&forward(g, &up), &dh)
        });
        check_gradient(&format!("swiglu dup (limit {limit})"), &up, &b.read(&du), 100, |u| {
            weighted_sum(&forward(&gate, u), &dh)
        });
    }
}

pub fn cross_entropy<B: Backend>(b: &B) {
    let mut rng = Rng::new(10);
    let (rows, vocab) = (7, 50);
    let mut logits = rng.normal_vec(rows * vocab, 4.0);
    let targets: Vec<i32> = vec![0, 49, 17, -100, 3, 3, 25];
    let weights = rng.normal_vec(rows, 1.0);
    let ti = b.upload_index(&targets);
    // Whether the target has the row's largest logit; row 1's target is made the largest.
    logits[vocab + 49] = 20.0;
    let want_correct: Vec<f64> = (0..rows)
        .map(|r| {
            let z = &logits[r * vocab..(r + 1) * vocab];
            let best = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            f64::from(u8::from(targets[r] >= 0 && z[targets[r] as usize] >= best))
        })
        .collect();
    assert!(want_correct.contains(&1.0) && want_correct.contains(&0.0));
    let want: Vec<f64> = (0..rows)
        .map(|r| {
            if targets[r] < 0 {
                return 0.0;
            }
            let z = &logits[r * vocab..(r + 1) * vocab];
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            lse - z[targets[r] as usize] as f64
        })
        .collect();
    let (mut nll, mut correct) = (b.zeros(rows), b.zeros(rows));
    b.cross_entropy_forward(&mut nll, &mut correct, &b.upload(&logits), &ti, vocab);
    assert_close("cross_entropy_forward", &b.read(&nll), &want, 1e-5, 1e-5);
    assert_close("cross_entropy_forward correct", &b.read(&correct), &want_correct, 0.0, 0.0);

    let (mut grad, mut nll2, mut correct2) = (b.upload(&logits), b.zeros(rows), b.zeros(rows));
    b.cross_entropy_backward(&mut grad, &mut nll2, &mut correct2, &ti, &b.upload(&weights), vocab);
    assert_close("cross_entropy_backward nll", &b.read(&nll2), &want, 1e-5, 1e-5);
    assert_close("cross_entropy_backward correct", &b.read(&correct2), &want_correct, 0.0, 0.0);
    check_gradient("cross_entropy dlogits", &logits, &b.read(&grad), 120, |z| {
        let (mut nll, mut correct) = (b.zeros(rows), b.zeros(rows));
        b.cross_entropy_forward(&mut nll, &mut correct, &b.upload(z), &ti, vocab);
        weighted_sum(&b.read(&nll), &weights)
    });
}

pub fn reverse_kl<B: Backend>(b: &B) {
    let mut rng = Rng::new(13);
    let (rows, vocab) = (6, 40);
    let student = rng.normal_vec(rows * vocab, 3.0);
    let teacher = rng.normal_vec(rows * vocab, 3.0);
    let weights = rng.normal_vec(rows, 1.0);
    let log_softmax = |z: &[f32]| -> Vec<f64> {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        z.iter().map(|&v| v as f64 - lse).collect()
    };
    let kl_of = |z: &[f32]| -> Vec<f64> {
        (0..rows)
            .map(|r| {
                let (lp, lq) = (log_softmax(&z[r * vocab..][..vocab]), log_softmax(&teacher[r * vocab..][..vocab]));
                lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum()
            })
            .collect()
    };
    let (mut grad, mut kl) = (b.upload(&student), b.zeros(rows));
    b.reverse_kl_backward(&mut grad, &mut kl, &b.upload(&teacher), &b.upload(&weights), vocab);
    assert_close("reverse_kl", &b.read(&kl), &kl_of(&student), 1e-6, 1e-5);
    check_gradient("reverse_kl dlogits", &student, &b.read(&grad), 120, |z| {
        kl_of(z).iter().zip(&weights).map(|(kl, &w)| kl * w as f64).sum()
    });
}

/// A row's softmax in f64: `(log Σ exp z, probabilities)`.
fn softmax_f64(z: &[f32]) -> (f64, Vec<f64>) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    (lse, z.iter().map(|&v| (v as f64 - lse).exp()).collect())
}

/// The whole row's `lse` from each block's `(max, log Σ exp(z − max))`, as two f32 values.
fn combine_blocks(stats: &[&[f32]]) -> [f32; 2] {
    let lse: Vec<f64> = stats.iter().map(|s| s[0] as f64 + s[1] as f64).collect();
    let top = lse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let whole = top + lse.iter().map(|l| (l - top).exp()).sum::<f64>().ln();
    let hi = whole as f32;
    [hi, (whole - hi as f64) as f32]
}

/// The losses over blocks of the vocabulary (vocabulary parallel) against the whole rows'.
pub fn vocab_blocks<B: Backend>(b: &B) {
    let mut rng = Rng::new(17);
    let (rows, vocab) = (5, 48);
    let blocks = [(0, 16), (16, 16), (32, 16)];
    let logits = rng.normal_vec(rows * vocab, 4.0);
    let teacher = rng.normal_vec(rows * vocab, 4.0);
    let weights = rng.normal_vec(rows, 1.0);
    let targets: Vec<i32> = vec![3, 47, -100, 16, 31];
    let block_of = |x: &[f32], (first, width): (usize, usize)| -> Vec<f32> {
        x.chunks(vocab).flat_map(|row| &row[first..first + width]).copied().collect()
    };
    let ti = b.upload_index(&targets);
    let stats_of = |x: &[f32]| -> Vec<Vec<f32>> {
        blocks
            .iter()
            .map(|&(first, width)| {
                let mut stats = b.zeros(rows * 3);
                b.vocab_block_stats(&mut stats, &b.upload(&block_of(x, (first, width))), &ti, width, first);
                b.read(&stats)
            })
            .collect()
    };
    let (zs, ys) = (stats_of(&logits), stats_of(&teacher));
    let row_lse =
        |stats: &[Vec<f32>], r: usize| combine_blocks(&stats.iter().map(|s| &s[r * 3..r * 3 + 2]).collect::<Vec<_>>());
    let soft: Vec<(f64, Vec<f64>)> = logits.chunks(vocab).map(softmax_f64).collect();
    let teacher_soft: Vec<(f64, Vec<f64>)> = teacher.chunks(vocab).map(softmax_f64).collect();
    for r in 0..rows {
        let [hi, lo] = row_lse(&zs, r);
        assert_close("vocab_block_stats lse", &[hi + lo], &[soft[r].0], 1e-5, 1e-6);
        // The target's logit: in the block that holds it, 0 in the others.
        let target_logit: f64 = zs.iter().map(|s| s[r * 3 + 2] as f64).sum();
        let want = usize::try_from(targets[r]).map_or(0.0, |t| logits[r * vocab + t] as f64);
        assert_close("vocab_block_stats target logit", &[target_logit as f32], &[want], 0.0, 0.0);
    }
    let lse: Vec<f32> = (0..rows).flat_map(|r| row_lse(&zs, r)).collect();
    let teacher_lse: Vec<f32> = (0..rows).flat_map(|r| row_lse(&ys, r)).collect();

    // Cross-entropy: dz = w·(softmax − onehot), zero for a row without a target.
    let want: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let (t, w) = (targets[r], weights[r] as f64);
            soft[r]
                .1
                .iter()
                .enumerate()
                .map(move |(j, &p)| if t < 0 { 0.0 } else { w * (p - f64::from(u8::from(j as i32 == t))) })
        })
        .collect();
    let mut got = vec![0.0; rows * vocab];
    for &(first, width) in &blocks {
        let mut grad = b.upload(&block_of(&logits, (first, width)));
        b.cross_entropy_block_backward(&mut grad, &b.upload(&lse), &ti, &b.upload(&weights), width, first);
        for (r, row) in b.read(&grad).chunks(width).enumerate() {
            got[r * vocab + first..][..width].copy_from_slice(row);
        }
    }
    assert_close("cross_entropy_block_backward", &got, &want, 1e-6, 1e-5);

    // Reverse KL: the blocks' parts sum to the row's KL; dz = w·p (log p − log q − KL).
    let kl_want: Vec<f64> =
        (0..rows).map(|r| soft[r].1.iter().zip(&teacher_soft[r].1).map(|(p, q)| p * (p.ln() - q.ln())).sum()).collect();
    let both: Vec<f32> =
        (0..rows).flat_map(|r| [lse[2 * r], lse[2 * r + 1], teacher_lse[2 * r], teacher_lse[2 * r + 1]]).collect();
    let mut kl = vec![0.0f32; rows];
    for &(first, width) in &blocks {
        let mut part = b.zeros(rows);
        let (z, y) = (b.upload(&block_of(&logits, (first, width))), b.upload(&block_of(&teacher, (first, width))));
        b.reverse_kl_block_forward(&mut part, &z, &y, &b.upload(&both), width);
        kl.iter_mut().zip(b.read(&part)).for_each(|(k, p)| *k += p);
    }
    assert_close("reverse_kl_block_forward", &kl, &kl_want, 1e-6, 1e-5);
    let want: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let (w, kl) = (weights[r] as f64, kl_want[r]);
            soft[r]
                .1
                .iter()
                .zip(&teacher_soft[r].1)
                .map(move |(p, q)| w * p * (p.ln() - q.ln() - kl))
                .collect::<Vec<_>>()
        })
        .collect();
    for &(first, width) in &blocks {
        let mut grad = b.upload(&block_of(&logits, (first, width)));
        let y = b.upload(&block_of(&teacher, (first, width)));
        b.reverse_kl_block_backward(&mut grad, &y, &b.upload(&both), &b.upload(&kl), &b.upload(&weights), width);
        for (r, row) in b.read(&grad).chunks(width).enumerate() {
            got[r * vocab + first..][..width].copy_from_slice(row);
        }
    }
    assert_close("reverse_kl_block_backward", &got, &want, 1e-6, 1e-5);
}

/// Reference router in f64: the chosen experts (best biased score first, or `given`) and
/// their weights.
fn route_reference(z: &[f32], bias: &[f32], given: &[i32], spec: Routing) -> Vec<(usize, f64)> {
    let per_group = spec.experts / spec.groups;
    let s: Vec<f64> = z
        .iter()
        .map(|&v| {
            let v = v as f64;
            match spec.scoring {
                Scoring::Sigmoid => 1.0 / (1.0 + (-v).exp()),
                Scoring::SqrtSoftplus => v.exp().ln_1p().sqrt(),
            }
        })
        .collect();
    if spec.fixed {
        let sum: f64 = given.iter().map(|&e| s[e as usize]).sum::<f64>() + 1e-20;
        let weight = |e: usize| if spec.normalize { s[e] / sum } else { s[e] } * spec.scale as f64;
        return given.iter().map(|&e| (e as usize, weight(e as usize))).collect();
    }
    let biased: Vec<f64> = s.iter().zip(bias).map(|(s, &b)| s + b as f64).collect();
    let desc = |v: &[f64]| {
        let mut o: Vec<usize> = (0..v.len()).collect();
        o.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        o
    };
    let group_score: Vec<f64> = biased.chunks(per_group).map(|g| desc(g).iter().take(2).map(|&i| g[i]).sum()).collect();
    let kept = &desc(&group_score)[..spec.top_groups];
    let masked: Vec<f64> = biased
        .iter()
        .enumerate()
        .map(|(e, &v)| if kept.contains(&(e / per_group)) { v } else { f64::NEG_INFINITY })
        .collect();
    let chosen = &desc(&masked)[..spec.top_k];
    let sum: f64 = chosen.iter().map(|&e| s[e]).sum::<f64>() + 1e-20;
    chosen.iter().map(|&e| (e, if spec.normalize { s[e] / sum } else { s[e] } * spec.scale as f64)).collect()
}

pub fn moe_route<B: Backend>(b: &B) {
    let mut rng = Rng::new(12);
    let v3 = Routing {
        scoring: Scoring::Sigmoid,
        fixed: false,
        tokens: 9,
        experts: 16,
        top_k: 4,
        groups: 4,
        top_groups: 2,
        normalize: true,
        scale: 2.5,
    };
    let v4 =
        Routing { scoring: Scoring::SqrtSoftplus, tokens: 7, experts: 8, top_k: 2, groups: 1, top_groups: 1, ..v3 };
    for spec in [
        v3,
        Routing { tokens: 7, experts: 8, top_k: 2, groups: 1, top_groups: 1, normalize: false, scale: 1.0, ..v3 },
        v4,
        // DeepSeek-V4's hash layers: the experts come from a table (a repeat included).
        Routing { fixed: true, ..v4 },
    ] {
        let (n, e, k) = (spec.tokens, spec.experts, spec.top_k);
        let z = rng.normal_vec(n * e, 2.0);
        let bias = rng.normal_vec(e, 0.3);
        let mut given: Vec<i32> = (0..n * k).map(|_| rng.below(e) as i32).collect();
        given[1] = given[0];
        let run = |z: &[f32]| {
            let (mut w, mut idx, mut s) = (b.zeros(n * k), b.upload_index(&given), b.zeros(n * e));
            b.moe_route_forward(&mut w, &mut idx, &mut s, &b.upload(z), &b.upload(&bias), spec);
            (w, idx, s)
        };
        let (w, idx, scores) = run(&z);
        let (got_w, got_idx) = (b.read(&w), b.read_index(&idx));
        for t in 0..n {
            let reference = route_reference(&z[t * e..(t + 1) * e], &bias, &given[t * k..(t + 1) * k], spec);
            for (j, (expert, want)) in reference.into_iter().enumerate() {
                assert_eq!(got_idx[t * k + j], expert as i32, "moe_route expert [{t},{j}] ({spec:?})");
                let got = got_w[t * k + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "moe_route weight [{t},{j}]: {got} vs reference {want}"
                );
            }
        }

        let g = rng.normal_vec(n * k, 1.0);
        let (mut dz, gb) = (b.zeros(n * e), b.upload(&g));
        b.moe_route_backward(&mut dz, &gb, &scores, &idx, spec);
        check_gradient_step(&format!("moe_route dlogits {spec:?}"), &z, &b.read(&dz), 60, 1e-3, |z| {
            weighted_sum(&b.read(&run(z).0), &g)
        });
    }
}

pub fn moe_dispatch<B: Backend>(b: &B) {
    let (tokens, top_k, experts) = (5, 2, 4);
    let indices = vec![3, 0, 1, 3, 3, 2, 0, 1, 1, 0];
    let weights: Vec<f32> = (0..tokens * top_k).map(|s| 0.1 * s as f32).collect();
    let slots = tokens * top_k;
    let (mut order, mut row_w, mut slot_rows) =
        (b.upload_index(&vec![0; slots]), b.zeros(slots), b.upload_index(&vec![0; slots]));
    let ib = b.upload_index(&indices);
    let rows = b.moe_dispatch(&mut order, &mut row_w, &mut slot_rows, &ib, &b.upload(&weights), experts, top_k);
    assert_eq!(rows, [3, 3, 1, 3], "moe_dispatch rows per expert");
    // Expert by expert, slots in token order.
    let indices_ref = &indices;
    let by_expert: Vec<usize> =
        (0..experts as i32).flat_map(|e| (0..slots).filter(move |&s| indices_ref[s] == e)).collect();
    let want_order: Vec<i32> = by_expert.iter().map(|&s| (s / top_k) as i32).collect();
    assert_eq!(b.read_index(&order), want_order, "moe_dispatch order");
    let want_w: Vec<f64> = by_expert.iter().map(|&s| weights[s] as f64).collect();
    assert_close("moe_dispatch row weights", &b.read(&row_w), &want_w, 0.0, 0.0);
    let slot_rows = b.read_index(&slot_rows);
    for (row, &slot) in by_expert.iter().enumerate() {
        assert_eq!(slot_rows[slot], row as i32, "moe_dispatch: row of slot {slot}");
    }
}

/// Operations on ranges of a buffer touch those values only.
pub fn slices<B: Backend>(b: &B) {
    let mut buf = b.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let (head, tail) = b.split_at_mut(&mut buf, 2);
    b.scale(tail, 10.0);
    b.add_assign(b.slice_mut(tail, 1..3), b.slice(head, 0..2));
    assert_eq!(b.len(head), 2);
    assert_eq!(b.read(b.slice(&buf, 1..6)), [2.0, 30.0, 41.0, 52.0, 60.0]);
    b.fill(b.slice_mut(&mut buf, 0..1), 0.5);
    assert_eq!(b.read(&buf), [0.5, 2.0, 30.0, 41.0, 52.0, 60.0]);
}

pub fn adamw<B: Backend>(b: &B) {
    let mut rng = Rng::new(11);
    let n = 1000;
    let hp0 = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 0 };
    let p0 = rng.normal_vec(n, 1.0);
    let (mut p, mut m, mut v) = (b.upload(&p0), b.zeros(n), b.zeros(n));
    let (mut rp, mut rm, mut rv) = (to_f64(&p0), vec![0.0f64; n], vec![0.0f64; n]);
    for step in 1..=3u64 {
        let g = rng.normal_vec(n, 1.0);
        let hp = AdamW { step, ..hp0 };
        b.adamw(&mut p, &b.upload(&g), &mut m, &mut v, hp);
        let (lr, b1, b2) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64);
        for i in 0..n {
            rp[i] *= 1.0 - lr * hp.weight_decay as f64;
            rm[i] = b1 * rm[i] + (1.0 - b1) * g[i] as f64;
            rv[i] = b2 * rv[i] + (1.0 - b2) * (g[i] as f64).powi(2);
            let mhat = rm[i] / (1.0 - b1.powi(step as i32));
            let vhat = rv[i] / (1.0 - b2.powi(step as i32));
            rp[i] -= lr * mhat / (vhat.sqrt() + hp.eps as f64);
        }
    }
    assert_close("adamw param", &b.read(&p), &rp, 1e-6, 1e-5);
    assert_close("adamw m", &b.read(&m), &rm, 1e-6, 1e-5);
    assert_close("adamw v", &b.read(&v), &rv, 1e-6, 1e-5);
}

/// Decoding over a cache gives what full causal attention gives at the same positions, whether a
/// query's rows are one range or a prompt's range elsewhere in the cache followed by its own
/// (a window reaching back into the prompt); over a bf16 cache, what it gives for the
/// bf16-rounded keys and values (the cache widens exactly).
pub fn attention_decode<B: Backend>(b: &B) {
    let mut rng = Rng::new(31);
    let (seq, q_heads, kv_heads, head_dim, v_head_dim) = (9, 4, 2, 8, 6);
    for (window, cache) in
        [(None, Precision::F32), (Some(4), Precision::F32), (None, Precision::Bf16), (Some(4), Precision::Bf16)]
    {
        let spec = Attention {
            batch: 1,
            seq,
            q_heads,
            kv_heads,
            head_dim,
            v_head_dim,
            scale: 0.4,
            window,
            precision: Precision::F32,
        };
        let q = rng.normal_vec(seq * q_heads * head_dim, 1.0);
        let mut k = rng.normal_vec(seq * kv_heads * head_dim, 1.0);
        let mut v = rng.normal_vec(seq * kv_heads * v_head_dim, 1.0);
        // The cache holds the sequence's rows, then a second copy of its first `prompt` rows
        // (a prompt cached apart from the rows that follow it).
        let prompt = 3;
        let cached: Vec<i32> = (0..seq as i32).chain(0..prompt as i32).collect();
        let all_rows = b.upload_index(&(0..(seq + prompt) as i32).collect::<Vec<_>>());
        let gather = |x: &[f32]| {
            let dim = x.len() / seq;
            cached.iter().flat_map(|&r| &x[r as usize * dim..][..dim]).copied().collect::<Vec<f32>>()
        };
        let (k_rows, v_rows) = (gather(&k), gather(&v));
        let (kc, vc) = match cache {
            Precision::F32 => (b.upload(&k_rows), b.upload(&v_rows)),
            Precision::Bf16 => {
                let mut kc = b.zeros(cache.words(k_rows.len()));
                let mut vc = b.zeros(cache.words(v_rows.len()));
                b.scatter_rows(&mut kc, &b.upload(&k_rows), &all_rows, kv_heads * head_dim, cache);
                b.scatter_rows(&mut vc, &b.upload(&v_rows), &all_rows, kv_heads * v_head_dim, cache);
                for x in k.iter_mut().chain(v.iter_mut()) {
                    *x = bf16::widen(bf16::round(*x));
                }
                (kc, vc)
            }
        };
        let qb = b.upload(&q);
        let mut full = b.zeros(seq * q_heads * v_head_dim);
        let mut lse = b.zeros(seq * q_heads);
        b.attention_forward(
            &mut full,
            &mut lse,
            &qb,
            &b.upload(&k),
            &b.upload(&v),
            &b.upload_index(&vec![0; seq]),
            spec,
        );
        // Query i is the newest token of a sequence whose cache holds rows 0..=i: for even i
        // as one range, for odd i as the prompt's copy then rows `prompt..=i`.
        let decode =
            DecodeAttention { queries: seq, q_heads, kv_heads, head_dim, v_head_dim, scale: 0.4, window, cache };
        let mut out = b.zeros(seq * q_heads * v_head_dim);
        let (mut starts, mut lengths) = (Vec::new(), Vec::new());
        for i in 0..seq as i32 {
            if i % 2 == 0 {
                starts.extend([0, 0]);
                lengths.extend([0, i + 1]);
            } else {
                let p = (i + 1).min(prompt as i32);
                starts.extend([seq as i32, prompt as i32]);
                lengths.extend([p, i + 1 - p]);
            }
        }
        let (starts, lengths) = (b.upload_index(&starts), b.upload_index(&lengths));
        b.attention_decode(&mut out, &qb, &kc, &vc, &starts, &lengths, decode);
        let want: Vec<f64> = b.read(&full).iter().map(|&x| x as f64).collect();
        assert_close(
            &format!("attention_decode ({cache:?} cache) vs attention_forward"),
            &b.read(&out),
            &want,
            1e-5,
            1e-4,
        );
    }
}

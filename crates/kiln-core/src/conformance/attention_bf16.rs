//! Attention with bf16 products (`Attention::precision`): forward and backward against f64
//! references on inputs already rounded to bf16, held to the rounding of the probabilities and
//! their gradients that a bf16 kernel adds (2% of each output's largest magnitude); a backend
//! that computes in f32 passes by a wide margin.

use super::attention_reference;
use crate::backend::{Attention, Backend, Precision};
use crate::bf16;
use crate::rng::Rng;

/// Shapes a tensor-core kernel takes (head dims multiples of 16): GQA, packing, a window, and
/// sequences over several 64-row tiles.
fn cases() -> Vec<(Attention, Vec<i32>)> {
    let base = Attention {
        batch: 2,
        seq: 70,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
        v_head_dim: 16,
        scale: 0.3,
        window: None,
        precision: Precision::Bf16,
    };
    let packed: Vec<i32> = (0..140).map(|t| i32::from(t % 70 >= 30) + i32::from(t % 70 >= 66)).collect();
    let long = Attention { batch: 1, seq: 150, q_heads: 2, kv_heads: 1, head_dim: 64, v_head_dim: 64, ..base };
    vec![(base, packed.clone()), (Attention { window: Some(20), ..base }, packed), (long, vec![0; 150])]
}

fn bf16_normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 1.0).into_iter().map(|x| bf16::widen(bf16::round(x))).collect()
}

/// dq, dk, dv of Σ g·out, in f64: with p the probabilities, D_i = Σ_j p_ij (g_i·v_j),
/// ds_ij = p_ij (g_i·v_j − D_i), dq_i = scale Σ_j ds_ij k_j, dk_j = scale Σ_i ds_ij q_i,
/// dv_j = Σ_i p_ij g_i.
fn backward_reference(
    (q, k, v): (&[f32], &[f32], &[f32]),
    g: &[f32],
    seg: &[i32],
    s: Attention,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hd, vd, group) = (s.head_dim, s.v_head_dim, s.q_heads / s.kv_heads);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq {
                let t = b * s.seq + i;
                let (qi, gi) = (t * s.q_heads + h, t * s.q_heads + h);
                let seen: Vec<usize> = (0..=i)
                    .filter(|&j| seg[b * s.seq + j] == seg[t] && s.window.is_none_or(|w| i - j < w))
                    .map(|j| (b * s.seq + j) * s.kv_heads + h / group)
                    .collect();
                let scores: Vec<f64> =
                    seen.iter().map(|&kj| dot(&q[qi * hd..][..hd], &k[kj * hd..][..hd]) * s.scale as f64).collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                let p: Vec<f64> = scores.iter().map(|x| (x - max).exp() / z).collect();
                let dp: Vec<f64> = seen.iter().map(|&kj| dot(&g[gi * vd..][..vd], &v[kj * vd..][..vd])).collect();
                let big_d: f64 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                for ((&kj, &pj), &dpj) in seen.iter().zip(&p).zip(&dp) {
                    let ds = pj * (dpj - big_d) * s.scale as f64;
                    for d in 0..hd {
                        dq[qi * hd + d] += ds * k[kj * hd + d] as f64;
                        dk[kj * hd + d] += ds * q[qi * hd + d] as f64;
                    }
                    for d in 0..vd {
                        dv[kj * vd + d] += pj * g[gi * vd + d] as f64;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// |got − want| ≤ 2% of want's largest magnitude, everywhere.
fn assert_near(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zero");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= 0.02 * scale, "{what}[{i}]: got {g}, reference {w} (largest {scale:.3e})");
    }
}

pub fn attention_bf16<B: Backend>(b: &B) {
    let mut rng = Rng::new(21);
    for (s, seg) in cases() {
        let n = s.tokens();
        let q = bf16_normal(&mut rng, n * s.q_heads * s.head_dim);
        let k = bf16_normal(&mut rng, n * s.kv_heads * s.head_dim);
        let v = bf16_normal(&mut rng, n * s.kv_heads * s.v_head_dim);
        let g = bf16_normal(&mut rng, n * s.q_heads * s.v_head_dim);
        let si = b.upload_index(&seg);
        let (qb, kb, vb) = (b.upload(&q), b.upload(&k), b.upload(&v));
        let (mut out, mut lse) = (b.zeros(n * s.q_heads * s.v_head_dim), b.zeros(s.batch * s.q_heads * s.seq));
        b.attention_forward(&mut out, &mut lse, &qb, &kb, &vb, &si, s);
        assert_near(&format!("attention_bf16 out {s:?}"), &b.read(&out), &attention_reference(&q, &k, &v, &seg, s));
        let (mut dq, mut dk, mut dv) = (b.zeros(q.len()), b.zeros(k.len()), b.zeros(v.len()));
        b.attention_backward(&mut dq, &mut dk, &mut dv, &b.upload(&g), &qb, &kb, &vb, &out, &lse, &si, s);
        let (want_dq, want_dk, want_dv) = backward_reference((&q, &k, &v), &g, &seg, s);
        assert_near(&format!("attention_bf16 dq {s:?}"), &b.read(&dq), &want_dq);
        assert_near(&format!("attention_bf16 dk {s:?}"), &b.read(&dk), &want_dk);
        assert_near(&format!("attention_bf16 dv {s:?}"), &b.read(&dv), &want_dv);
    }
}

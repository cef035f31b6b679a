//! Attention with sinks (gpt-oss, DeepSeek-V4): `attention_forward` then
//! `attention_sinks_forward` against an f64 softmax over the allowed keys and the sink; the
//! gradients of q, k, v (from `attention_backward` given the sink-adjusted out and lse) and of
//! the sinks against central differences of that composition.

use super::{assert_close, check_gradient, weighted_sum};
use crate::backend::{Attention, Backend, Precision};
use crate::rng::Rng;

/// One shared key/value head, a window and two packed sequences per row, as V4's layers see.
fn spec() -> Attention {
    Attention {
        batch: 2,
        seq: 20,
        q_heads: 4,
        kv_heads: 1,
        head_dim: 8,
        v_head_dim: 8,
        scale: 0.35,
        window: Some(6),
        precision: Precision::F32,
    }
}

fn segments(s: &Attention) -> Vec<i32> {
    (0..s.tokens()).map(|t| i32::from(t % s.seq >= 12)).collect()
}

fn reference(q: &[f32], k: &[f32], v: &[f32], sinks: &[f32], seg: &[i32], s: &Attention) -> Vec<f64> {
    let (hd, vd) = (s.head_dim, s.v_head_dim);
    let mut out = vec![0.0f64; s.tokens() * s.q_heads * vd];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.seq {
                let t = b * s.seq + i;
                let allowed = |j: usize| j <= i && seg[t] == seg[b * s.seq + j] && s.window.is_none_or(|w| i - j < w);
                let score = |j: usize| {
                    let (qi, kj) = ((t * s.q_heads + h) * hd, (b * s.seq + j) * hd);
                    (0..hd).map(|d| q[qi + d] as f64 * k[kj + d] as f64).sum::<f64>() * s.scale as f64
                };
                let scores: Vec<(usize, f64)> = (0..s.seq).filter(|&j| allowed(j)).map(|j| (j, score(j))).collect();
                let max = scores.iter().map(|p| p.1).fold(sinks[h] as f64, f64::max);
                let z: f64 = scores.iter().map(|p| (p.1 - max).exp()).sum::<f64>() + (sinks[h] as f64 - max).exp();
                for &(j, sc) in &scores {
                    let p = (sc - max).exp() / z;
                    for d in 0..vd {
                        out[(t * s.q_heads + h) * vd + d] += p * v[(b * s.seq + j) * vd + d] as f64;
                    }
                }
            }
        }
    }
    out
}

#[allow(clippy::type_complexity)]
fn run<B: Backend>(b: &B, q: &[f32], k: &[f32], v: &[f32], sinks: &[f32], seg: &B::Index) -> (B::Buf, B::Buf) {
    let s = spec();
    let (mut out, mut lse) = (b.zeros(s.tokens() * s.q_heads * s.v_head_dim), b.zeros(s.tokens() * s.q_heads));
    b.attention_forward(&mut out, &mut lse, &b.upload(q), &b.upload(k), &b.upload(v), seg, s);
    b.attention_sinks_forward(&mut out, &mut lse, &b.upload(sinks), s);
    (out, lse)
}

pub fn attention_sinks<B: Backend>(b: &B) {
    let s = spec();
    let mut rng = Rng::new(31);
    let n = s.tokens();
    let (q, k, v) = (rng.normal_vec(n * s.q_heads * 8, 1.0), rng.normal_vec(n * 8, 1.0), rng.normal_vec(n * 8, 1.0));
    // Sinks from negligible to dominant.
    let sinks = vec![-4.0, 0.0, 1.5, 3.0];
    let seg = segments(&s);
    let si = b.upload_index(&seg);
    let (out, lse) = run(b, &q, &k, &v, &sinks, &si);
    assert_close("attention_sinks_forward", &b.read(&out), &reference(&q, &k, &v, &sinks, &seg, &s), 1e-5, 1e-4);

    let g = rng.normal_vec(n * s.q_heads * 8, 1.0);
    let gb = b.upload(&g);
    let (mut dq, mut dk, mut dv) = (b.zeros(q.len()), b.zeros(k.len()), b.zeros(v.len()));
    let (qb, kb, vb) = (b.upload(&q), b.upload(&k), b.upload(&v));
    b.attention_backward(&mut dq, &mut dk, &mut dv, &gb, &qb, &kb, &vb, &out, &lse, &si, s);
    let mut dsinks = b.upload(&[0.5; 4]);
    b.attention_sinks_backward(&mut dsinks, &gb, &out, &lse, &b.upload(&sinks), s);
    let dsinks: Vec<f32> = b.read(&dsinks).iter().map(|d| d - 0.5).collect();
    let loss =
        |q: &[f32], k: &[f32], v: &[f32], sinks: &[f32]| weighted_sum(&b.read(&run(b, q, k, v, sinks, &si).0), &g);
    check_gradient("attention_sinks dq", &q, &b.read(&dq), 40, |x| loss(x, &k, &v, &sinks));
    check_gradient("attention_sinks dk", &k, &b.read(&dk), 40, |x| loss(&q, x, &v, &sinks));
    check_gradient("attention_sinks dv", &v, &b.read(&dv), 40, |x| loss(&q, &k, x, &sinks));
    check_gradient("attention_sinks dsinks (accumulated)", &sinks, &dsinks, 4, |x| loss(&q, &k, &v, x));
}

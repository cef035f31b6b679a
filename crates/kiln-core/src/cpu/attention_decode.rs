//! Attention of new tokens over a key/value cache (decoding): for query i and head h, over its
//! cached rows j,
//!   s_j = scale·q·k_j,  p_j = exp(s_j − max s) / Σ exp(s − max s),  o = Σ_j p_j v_j
//! computed exactly (two passes over the scores), one task per (query, head). The dot products
//! run in 16 partial sums and the exponentials through [`fast_exp`], so both vectorise.

use super::Shared;
use crate::backend::DecodeAttention;
use crate::fast_exp::fast_exp;
use rayon::prelude::*;

pub fn forward(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    starts: &[i32],
    lengths: &[i32],
    spec: DecodeAttention,
) {
    let DecodeAttention { queries, q_heads, kv_heads, head_dim, v_head_dim, scale, window } = spec;
    assert!(
        kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
        "attention_decode: q heads must be a multiple of kv heads"
    );
    assert_eq!(q.len(), queries * q_heads * head_dim, "attention_decode: q size");
    assert_eq!(out.len(), queries * q_heads * v_head_dim, "attention_decode: out size");
    assert!(starts.len() == queries && lengths.len() == queries, "attention_decode: one start and length per query");
    let (k_row, v_row) = (kv_heads * head_dim, kv_heads * v_head_dim);
    let cache_rows = k_cache.len() / k_row;
    assert_eq!(v_cache.len() / v_row, cache_rows, "attention_decode: k and v caches differ in rows");
    let group = q_heads / kv_heads;
    let out_ptr = Shared(out.as_mut_ptr());
    (0..queries * q_heads).into_par_iter().for_each(|task| {
        let (i, h) = (task / q_heads, task % q_heads);
        let (start, len) = (starts[i] as usize, lengths[i] as usize);
        assert!(
            len > 0 && start + len <= cache_rows,
            "attention_decode: rows {start}..{} beyond the cache",
            start + len
        );
        let first = window.map_or(0, |w| len.saturating_sub(w));
        let kv = h / group;
        let qv = &q[(i * q_heads + h) * head_dim..][..head_dim];
        let mut weights: Vec<f32> = (first..len)
            .map(|j| scale * dot(qv, &k_cache[(start + j) * k_row + kv * head_dim..][..head_dim]))
            .collect();
        let max = weights.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        weights.iter_mut().for_each(|w| *w = fast_exp(*w - max));
        let sum: f32 = weights.iter().sum();
        // SAFETY: each task writes its own (query, head) slice of `out`.
        let o =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add((i * q_heads + h) * v_head_dim), v_head_dim) };
        o.iter_mut().for_each(|x| *x = 0.0);
        let inv_sum = 1.0 / sum;
        for (j, w) in (first..len).zip(&weights) {
            let v = &v_cache[(start + j) * v_row + kv * v_head_dim..][..v_head_dim];
            axpy(o, w * inv_sum, v);
        }
    });
}

/// `Σ_i a_i·b_i` as 16 interleaved partial sums (one vector register), then their total.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16.remainder().iter().zip(b16.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `o += p·v`, 16 lanes at a time.
#[inline]
fn axpy(o: &mut [f32], p: f32, v: &[f32]) {
    let mut o16 = o.chunks_exact_mut(16);
    let mut v16 = v.chunks_exact(16);
    for (o, v) in (&mut o16).zip(&mut v16) {
        for l in 0..16 {
            o[l] = p.mul_add(v[l], o[l]);
        }
    }
    for (o, v) in o16.into_remainder().iter_mut().zip(v16.remainder()) {
        *o = p.mul_add(*v, *o);
    }
}

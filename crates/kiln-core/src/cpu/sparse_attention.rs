//! Attention over chosen shared entries (DeepSeek-V4's compressed entries), the merge of two
//! attentions over disjoint keys, and the lightning indexer that chooses (see
//! `backend::SparseAttention`, `Backend::attention_merge`, `backend::Indexer`).
//!
//! Forward per query i, head h over its chosen entries j (keys = values = E):
//!   s_j = scale·q_ih·E_j,  lse = log Σ_j e^(s_j),  o_ih = Σ_j e^(s_j − lse) E_j
//! Backward given (possibly merged) o and lse, D = do·o:
//!   p_j = e^(s_j − lse),  ds_j = p_j (do·E_j − D)
//!   dq_ih = scale Σ_j ds_j E_j,  dE_j += p_j do + scale ds_j q_ih
//! Merge of (o₁, l₁) and (o₂, l₂): l = log(e^l₁ + e^l₂), o = e^(l₁ − l) o₁ + e^(l₂ − l) o₂.

use crate::backend::{Attention, Indexer, SparseAttention};
use rayon::prelude::*;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn lse_at(spec: &SparseAttention, t: usize, h: usize) -> usize {
    let (row, i) = (t / spec.seq, t % spec.seq);
    (row * spec.q_heads + h) * spec.seq + i
}

fn check(q: usize, entries: usize, chosen: usize, out: usize, lse: usize, spec: &SparseAttention) {
    let (n, hd) = (spec.tokens(), spec.head_dim);
    assert_eq!(q, n * spec.q_heads * hd, "sparse_attention: q must be [tokens, q_heads, head_dim]");
    assert_eq!(out, q, "sparse_attention: out must be shaped as q");
    assert_eq!(lse, n * spec.q_heads, "sparse_attention: lse must be [batch, q_heads, seq]");
    assert_eq!(entries, spec.entries * hd, "sparse_attention: entries must be [entries, head_dim]");
    assert_eq!(chosen, n * spec.top_k, "sparse_attention: chosen must be [tokens, top_k]");
}

/// The chosen entries of query `t`.
fn chosen_of<'a>(chosen: &'a [i32], t: usize, k: usize) -> impl Iterator<Item = usize> + 'a {
    chosen[t * k..(t + 1) * k].iter().filter(|&&e| e >= 0).map(|&e| e as usize)
}

pub fn forward(out: &mut [f32], lse: &mut [f32], q: &[f32], entries: &[f32], chosen: &[i32], spec: SparseAttention) {
    check(q.len(), entries.len(), chosen.len(), out.len(), lse.len(), &spec);
    let (hd, heads) = (spec.head_dim, spec.q_heads);
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..spec.tokens())
        .into_par_iter()
        .map(|t| {
            let mut o = vec![0.0f32; heads * hd];
            let mut l = vec![f32::NEG_INFINITY; heads];
            let picks: Vec<usize> = chosen_of(chosen, t, spec.top_k).collect();
            for h in 0..heads {
                let qh = &q[(t * heads + h) * hd..][..hd];
                let s: Vec<f32> = picks.iter().map(|&e| spec.scale * dot(qh, &entries[e * hd..][..hd])).collect();
                if s.is_empty() {
                    continue;
                }
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = s.iter().map(|s| (s - max).exp()).sum();
                l[h] = max + sum.ln();
                let oh = &mut o[h * hd..(h + 1) * hd];
                for (&e, s) in picks.iter().zip(&s) {
                    let p = (s - l[h]).exp();
                    oh.iter_mut().zip(&entries[e * hd..][..hd]).for_each(|(o, v)| *o += p * v);
                }
            }
            (o, l)
        })
        .collect();
    for (t, (o, l)) in results.into_iter().enumerate() {
        out[t * heads * hd..(t + 1) * heads * hd].copy_from_slice(&o);
        for (h, l) in l.into_iter().enumerate() {
            lse[lse_at(&spec, t, h)] = l;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dentries: &mut [f32],
    dout: &[f32],
    q: &[f32],
    entries: &[f32],
    chosen: &[i32],
    out: &[f32],
    lse: &[f32],
    spec: SparseAttention,
) {
    check(q.len(), entries.len(), chosen.len(), out.len(), lse.len(), &spec);
    assert!(dq.len() == q.len() && dentries.len() == entries.len() && dout.len() == out.len());
    let (hd, heads) = (spec.head_dim, spec.q_heads);
    dentries.fill(0.0);
    // Queries in order: an entry's gradient sums its queries' terms the same way every time.
    for t in 0..spec.tokens() {
        let picks: Vec<usize> = chosen_of(chosen, t, spec.top_k).collect();
        for h in 0..heads {
            let at = (t * heads + h) * hd;
            let (qh, doh, oh) = (&q[at..at + hd], &dout[at..at + hd], &out[at..at + hd]);
            let l = lse[lse_at(&spec, t, h)];
            let big_d = dot(doh, oh);
            let dqh = &mut dq[at..at + hd];
            dqh.fill(0.0);
            for &e in &picks {
                let ev = &entries[e * hd..(e + 1) * hd];
                let p = (spec.scale * dot(qh, ev) - l).exp();
                let ds = p * (dot(doh, ev) - big_d);
                dqh.iter_mut().zip(ev).for_each(|(d, v)| *d += spec.scale * ds * v);
                let de = &mut dentries[e * hd..(e + 1) * hd];
                for d in 0..hd {
                    de[d] += p * doh[d] + spec.scale * ds * qh[d];
                }
            }
        }
    }
}

pub fn merge(out: &mut [f32], lse: &mut [f32], other_out: &[f32], other_lse: &[f32], spec: Attention) {
    let (seq, heads, dv) = (spec.seq, spec.q_heads, spec.v_head_dim);
    assert!(out.len() == other_out.len() && lse.len() == other_lse.len(), "attention_merge: shapes differ");
    assert!(
        out.len() == spec.tokens() * heads * dv && lse.len() == spec.tokens() * heads,
        "attention_merge: out must be [tokens, q_heads, v_head_dim] and lse [batch, q_heads, seq]"
    );
    for (idx, (l, &l2)) in lse.iter_mut().zip(other_lse).enumerate() {
        let (row_head, i) = (idx / seq, idx % seq);
        let (row, h) = (row_head / heads, row_head % heads);
        let at = ((row * seq + i) * heads + h) * dv;
        let merged = log_add_exp(*l, l2);
        if merged == f32::NEG_INFINITY {
            continue;
        }
        let (w1, w2) = ((*l - merged).exp(), (l2 - merged).exp());
        let o2 = &other_out[at..at + dv];
        out[at..at + dv].iter_mut().zip(o2).for_each(|(a, b)| *a = w1 * *a + w2 * b);
        *l = merged;
    }
}

/// `log(e^a + e^b)`, exact where one is −∞.
pub(super) fn log_add_exp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f32::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

pub fn indexer_topk(chosen: &mut [i32], q: &[f32], keys: &[f32], weights: &[f32], visible: &[i32], spec: Indexer) {
    let (n, heads, hd, k) = (spec.tokens, spec.heads, spec.head_dim, spec.top_k);
    assert!(chosen.len() == n * k && q.len() == n * heads * hd && weights.len() == n * heads, "indexer_topk: shapes");
    assert!(
        keys.len() == spec.entries * hd && visible.len() == 2 * n,
        "indexer_topk: keys [entries, head_dim], visible [tokens, 2]"
    );
    chosen.par_chunks_mut(k).enumerate().for_each(|(t, out)| {
        let (first, count) = (visible[2 * t] as usize, visible[2 * t + 1] as usize);
        let mut scored: Vec<(f32, usize)> = (first..first + count)
            .map(|e| {
                let key = &keys[e * hd..(e + 1) * hd];
                let s: f32 = (0..heads)
                    .map(|h| weights[t * heads + h] * dot(&q[(t * heads + h) * hd..][..hd], key).max(0.0))
                    .sum();
                (s * spec.scale, e)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (j, o) in out.iter_mut().enumerate() {
            *o = scored.get(j).map_or(-1, |&(_, e)| e as i32);
        }
    });
}

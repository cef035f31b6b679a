//! DeepSeek-V4's compressed attention: the compressor pooling (heavily compressed windows and
//! compressed sparse overlapping ones, with absent slots) against an f64 reference and its
//! backward against central differences; the lightning indexer's choices against a reference;
//! sliding attention merged with attention over chosen entries against an f64 softmax over
//! both key sets, and every gradient of that composition (given the merged out and lse).

use super::{assert_close, check_gradient, weighted_sum};
use crate::backend::{Attention, Backend, Indexer, Pooling, Precision, SparseAttention};
use crate::rng::Rng;

fn pool_reference(kv: &[f32], gate: &[f32], ape: &[f32], slots: &[i32], spec: &Pooling) -> Vec<f64> {
    let (c, w, m) = (spec.series(), spec.width, spec.rate);
    let mut out = vec![0.0f64; spec.entries * w];
    for e in 0..spec.entries {
        for f in 0..w {
            let terms: Vec<(f64, f64)> = (0..c * m)
                .filter(|&s| slots[e * c * m + s] >= 0)
                .map(|s| {
                    let (t, at) = (slots[e * c * m + s] as usize, (s / m) * w + f);
                    (gate[t * c * w + at] as f64 + ape[(s % m) * c * w + at] as f64, kv[t * c * w + at] as f64)
                })
                .collect();
            let max = terms.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = terms.iter().map(|t| (t.0 - max).exp()).sum();
            out[e * w + f] = terms.iter().map(|t| (t.0 - max).exp() / z * t.1).sum();
        }
    }
    out
}

pub fn pooling<B: Backend>(b: &B) {
    let mut rng = Rng::new(41);
    for overlap in [false, true] {
        let spec = Pooling { entries: 3, rate: 4, width: 5, overlap };
        let (c, tokens) = (spec.series(), 14);
        let kv = rng.normal_vec(tokens * c * spec.width, 1.0);
        let gate = rng.normal_vec(tokens * c * spec.width, 1.0);
        let ape = rng.normal_vec(spec.rate * c * spec.width, 0.5);
        // Windows at tokens 0, 4, 8; with overlap the first entry has no previous window.
        let slots: Vec<i32> = (0..spec.entries)
            .flat_map(|e| {
                let own = (0..4).map(move |i| (e * 4 + i) as i32);
                let previous = (0..4).map(move |i| if e == 0 { -1 } else { ((e - 1) * 4 + i) as i32 });
                if overlap {
                    previous.chain(own).collect::<Vec<_>>()
                } else {
                    own.collect()
                }
            })
            .collect();
        let si = b.upload_index(&slots);
        let run = |kv: &[f32], gate: &[f32], ape: &[f32]| {
            let mut out = b.zeros(spec.entries * spec.width);
            b.pool_forward(&mut out, &b.upload(kv), &b.upload(gate), &b.upload(ape), &si, spec);
            b.read(&out)
        };
        let what = format!("pool (overlap {overlap})");
        assert_close(&what, &run(&kv, &gate, &ape), &pool_reference(&kv, &gate, &ape, &slots, &spec), 1e-6, 1e-5);
        let g = rng.normal_vec(spec.entries * spec.width, 1.0);
        let (mut dkv, mut dgate, mut dape) = (b.upload(&kv), b.upload(&gate), b.zeros(ape.len()));
        let (kvb, gb, ab) = (b.upload(&kv), b.upload(&gate), b.upload(&ape));
        b.pool_backward(&mut dkv, &mut dgate, &mut dape, &b.upload(&g), &kvb, &gb, &ab, &si, spec);
        check_gradient(&format!("{what} dkv"), &kv, &b.read(&dkv), 60, |x| weighted_sum(&run(x, &gate, &ape), &g));
        check_gradient(&format!("{what} dgate"), &gate, &b.read(&dgate), 60, |x| weighted_sum(&run(&kv, x, &ape), &g));
        check_gradient(&format!("{what} dape"), &ape, &b.read(&dape), 40, |x| weighted_sum(&run(&kv, &gate, x), &g));
    }
}

pub fn indexer<B: Backend>(b: &B) {
    let mut rng = Rng::new(42);
    let spec = Indexer { tokens: 9, heads: 3, head_dim: 4, entries: 6, top_k: 3, scale: 0.4 };
    let q = rng.normal_vec(spec.tokens * spec.heads * spec.head_dim, 1.0);
    let keys = rng.normal_vec(spec.entries * spec.head_dim, 1.0);
    let weights = rng.normal_vec(spec.tokens * spec.heads, 1.0);
    // Token t sees entries first..first + t/2 of its sequence (two sequences of entries 0..3, 3..6).
    let visible: Vec<i32> =
        (0..spec.tokens).flat_map(|t| [if t < 5 { 0 } else { 3 }, (t as i32 % 5) / 2 + 1]).collect();
    let mut chosen = b.upload_index(&vec![7; spec.tokens * spec.top_k]);
    let (qb, kb, wb) = (b.upload(&q), b.upload(&keys), b.upload(&weights));
    b.indexer_topk(&mut chosen, &qb, &kb, &wb, &b.upload_index(&visible), spec);
    let got = b.read_index(&chosen);
    let hd = spec.head_dim;
    for t in 0..spec.tokens {
        let (first, count) = (visible[2 * t] as usize, visible[2 * t + 1] as usize);
        let score = |e: usize| -> f64 {
            (0..spec.heads)
                .map(|h| {
                    let dot: f64 =
                        (0..hd).map(|d| q[(t * spec.heads + h) * hd + d] as f64 * keys[e * hd + d] as f64).sum();
                    weights[t * spec.heads + h] as f64 * dot.max(0.0)
                })
                .sum()
        };
        let mut order: Vec<usize> = (first..first + count).collect();
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        let want: Vec<i32> = (0..spec.top_k).map(|j| order.get(j).map_or(-1, |&e| e as i32)).collect();
        assert_eq!(&got[t * spec.top_k..(t + 1) * spec.top_k], &want[..], "indexer_topk token {t}");
    }
}

/// Sliding attention over one shared head (window 4) merged with attention over chosen entries.
fn merged_spec() -> (Attention, SparseAttention) {
    let a = Attention {
        batch: 2,
        seq: 10,
        q_heads: 3,
        kv_heads: 1,
        head_dim: 6,
        v_head_dim: 6,
        scale: 0.4,
        window: Some(4),
        precision: Precision::F32,
    };
    let s = SparseAttention { batch: 2, seq: 10, q_heads: 3, head_dim: 6, entries: 5, top_k: 3, scale: 0.4 };
    (a, s)
}

/// The entries each query attends: none for the first tokens, then up to three (one absent).
fn chosen(s: &SparseAttention) -> Vec<i32> {
    (0..s.tokens())
        .flat_map(|t| {
            let i = t % s.seq;
            let base = if t < s.seq { 0 } else { 2 };
            [if i >= 3 { base } else { -1 }, if i >= 6 { base + 1 } else { -1 }, if i >= 8 { base + 2 } else { -1 }]
        })
        .collect()
}

fn merged_reference(q: &[f32], kv: &[f32], entries: &[f32], chosen: &[i32], a: &Attention) -> Vec<f64> {
    let (hd, h) = (a.head_dim, a.q_heads);
    let mut out = vec![0.0f64; a.tokens() * h * hd];
    for t in 0..a.tokens() {
        let (row, i) = (t / a.seq, t % a.seq);
        let keys: Vec<&[f32]> = (0..a.seq)
            .filter(|&j| j <= i && i - j < a.window.unwrap())
            .map(|j| &kv[(row * a.seq + j) * hd..][..hd])
            .chain(chosen[t * 3..t * 3 + 3].iter().filter(|&&e| e >= 0).map(|&e| &entries[e as usize * hd..][..hd]))
            .collect();
        for head in 0..h {
            let qh = &q[(t * h + head) * hd..][..hd];
            let s: Vec<f64> = keys
                .iter()
                .map(|k| k.iter().zip(qh).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * a.scale as f64)
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|s| (s - max).exp()).sum();
            for (k, s) in keys.iter().zip(&s) {
                for d in 0..hd {
                    out[(t * h + head) * hd + d] += (s - max).exp() / z * k[d] as f64;
                }
            }
        }
    }
    out
}

pub fn sparse_attention<B: Backend>(b: &B) {
    let (a, s) = merged_spec();
    let mut rng = Rng::new(43);
    let n = a.tokens();
    let q = rng.normal_vec(n * a.q_heads * a.head_dim, 1.0);
    let kv = rng.normal_vec(n * a.head_dim, 1.0);
    let entries = rng.normal_vec(s.entries * s.head_dim, 1.0);
    let picks = chosen(&s);
    let (ci, seg) = (b.upload_index(&picks), b.upload_index(&vec![0; n]));
    let run = |q: &[f32], kv: &[f32], entries: &[f32]| {
        let (qb, kvb) = (b.upload(q), b.upload(kv));
        let (mut out, mut lse) = (b.zeros(q.len()), b.zeros(n * a.q_heads));
        b.attention_forward(&mut out, &mut lse, &qb, &kvb, &kvb, &seg, a);
        let (mut out2, mut lse2) = (b.zeros(q.len()), b.zeros(n * a.q_heads));
        b.sparse_attention_forward(&mut out2, &mut lse2, &qb, &b.upload(entries), &ci, s);
        b.attention_merge(&mut out, &mut lse, &out2, &lse2, a);
        (out, lse)
    };
    let (out, lse) = run(&q, &kv, &entries);
    let want = merged_reference(&q, &kv, &entries, &picks, &a);
    assert_close("sparse_attention merged with sliding attention", &b.read(&out), &want, 1e-5, 1e-4);

    let g = rng.normal_vec(q.len(), 1.0);
    let gb = b.upload(&g);
    let (qb, kvb, eb) = (b.upload(&q), b.upload(&kv), b.upload(&entries));
    let (mut dq, mut dk, mut dv) = (b.zeros(q.len()), b.zeros(kv.len()), b.zeros(kv.len()));
    b.attention_backward(&mut dq, &mut dk, &mut dv, &gb, &qb, &kvb, &kvb, &out, &lse, &seg, a);
    let (mut dq2, mut dentries) = (b.zeros(q.len()), b.zeros(entries.len()));
    b.sparse_attention_backward(&mut dq2, &mut dentries, &gb, &qb, &eb, &ci, &out, &lse, s);
    b.add_assign(&mut dq, &dq2);
    b.add_assign(&mut dk, &dv);
    let loss = |q: &[f32], kv: &[f32], e: &[f32]| weighted_sum(&b.read(&run(q, kv, e).0), &g);
    check_gradient("merged attention dq", &q, &b.read(&dq), 40, |x| loss(x, &kv, &entries));
    check_gradient("merged attention dkv", &kv, &b.read(&dk), 40, |x| loss(&q, x, &entries));
    check_gradient("merged attention dentries", &entries, &b.read(&dentries), 30, |x| loss(&q, &kv, x));
}

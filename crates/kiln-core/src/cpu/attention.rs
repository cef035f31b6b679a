//! Causal grouped-query attention with segment masks, tiled so that memory stays linear in
//! sequence length (FlashAttention-2's schedule on CPU: blocks of queries against blocks of
//! keys, an online softmax, and only the log-sum-exp of each score row kept for backward).
//!
//! Forward, per query row i over allowed keys j (mask M):
//!   s_ij = scale·q_i·k_j,  lse_i = log Σ_j exp(s_ij),  p_ij = exp(s_ij − lse_i)
//!   o_i = Σ_j p_ij v_j
//! Backward, with D_i = do_i·o_i:
//!   dv_j = Σ_i p_ij do_i,  dp_ij = do_i·v_j,  ds_ij = p_ij (dp_ij − D_i)
//!   dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i

use super::matmul::{gemm_strided, Strided};
use super::Shared;
use crate::backend::{segment_sees, Attention};
use crate::fast_exp::fast_exp;
use rayon::prelude::*;

const BLOCK: usize = 64;

/// Where one (batch row, head) lives inside a `[tokens, heads, dim]` buffer.
#[derive(Clone, Copy)]
struct HeadView {
    /// Offset of token 0 of the batch row, head `h`.
    base: usize,
    /// Distance between consecutive tokens.
    stride: usize,
}

impl HeadView {
    fn new(spec: &Attention, b: usize, head: usize, heads: usize, dim: usize) -> Self {
        let stride = heads * dim;
        Self { base: b * spec.seq * stride + head * dim, stride }
    }
    /// Rows `start..` as a strided `[rows, dim]` matrix.
    fn rows(&self, ptr: *const f32, start: usize) -> Strided<*const f32> {
        Strided { ptr: unsafe { ptr.add(self.base + start * self.stride) }, rs: self.stride as isize, cs: 1 }
    }
    /// Rows `start..` transposed: a strided `[dim, rows]` matrix.
    fn rows_t(&self, ptr: *const f32, start: usize) -> Strided<*const f32> {
        Strided { ptr: unsafe { ptr.add(self.base + start * self.stride) }, rs: 1, cs: self.stride as isize }
    }
    fn rows_mut(&self, ptr: Shared, start: usize) -> Strided<*mut f32> {
        Strided { ptr: unsafe { ptr.ptr().add(self.base + start * self.stride) }, rs: self.stride as isize, cs: 1 }
    }
}

/// The mask for one batch row.
struct Mask<'a> {
    segments: &'a [i32],
    window: Option<usize>,
}

impl Mask<'_> {
    #[inline]
    fn allowed(&self, i: usize, j: usize) -> bool {
        let (si, sj) = (self.segments[i], self.segments[j]);
        j <= i && segment_sees(si, sj) && self.window.is_none_or(|w| i - j < w)
    }
    /// First key block that any query in `i0..` can see.
    fn first_key(&self, i0: usize) -> usize {
        self.window.map_or(0, |w| (i0 + 1).saturating_sub(w)) / BLOCK * BLOCK
    }
    /// Whether any query of `queries` may see a key of `keys`: blocks that hold only other
    /// segments (earlier packed sequences, a prompt's other completions, other groups) are
    /// skipped. Skipping leaves the result's bits as they are: such a block adds exact zeros.
    fn sees_block(&self, queries: std::ops::Range<usize>, keys: std::ops::Range<usize>) -> bool {
        let mut seen = [0i32; 4];
        let mut distinct = 0;
        for &s in &self.segments[queries] {
            if !seen[..distinct].contains(&s) {
                if distinct == seen.len() {
                    return true;
                }
                seen[distinct] = s;
                distinct += 1;
            }
        }
        let seen = &seen[..distinct];
        self.segments[keys].iter().any(|&key| seen.iter().any(|&query| segment_sees(query, key)))
    }
}

fn check_shapes(spec: &Attention, q: usize, k: usize, v: usize, segments: usize) {
    let n = spec.tokens();
    assert!(
        spec.kv_heads > 0 && spec.q_heads.is_multiple_of(spec.kv_heads),
        "attention: {} query heads not a multiple of {} kv heads",
        spec.q_heads,
        spec.kv_heads
    );
    assert_eq!(q, n * spec.q_heads * spec.head_dim, "attention: q size mismatch");
    assert_eq!(k, n * spec.kv_heads * spec.head_dim, "attention: k size mismatch");
    assert_eq!(v, n * spec.kv_heads * spec.v_head_dim, "attention: v size mismatch");
    assert_eq!(segments, n, "attention: one segment id per token expected");
}

/// `s[r, c] = scale · q_{i0+r} · k_{j0+c}` for the block, masked entries `-inf`.
#[allow(clippy::too_many_arguments)]
fn scores(
    s: &mut [f32],
    q: Strided<*const f32>,
    k: Strided<*const f32>,
    (i0, bq): (usize, usize),
    (j0, bk): (usize, usize),
    hd: usize,
    scale: f32,
    mask: &Mask,
) {
    unsafe { gemm_strided(bq, bk, hd, Strided { ptr: s.as_mut_ptr(), rs: BLOCK as isize, cs: 1 }, false, q, k, false) };
    for r in 0..bq {
        let row = &mut s[r * BLOCK..r * BLOCK + bk];
        for (c, v) in row.iter_mut().enumerate() {
            *v = if mask.allowed(i0 + r, j0 + c) { *v * scale } else { f32::NEG_INFINITY };
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward(out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], segments: &[i32], spec: Attention) {
    check_shapes(&spec, q.len(), k.len(), v.len(), segments.len());
    assert_eq!(out.len(), spec.tokens() * spec.q_heads * spec.v_head_dim, "attention: out size mismatch");
    assert_eq!(lse.len(), spec.batch * spec.q_heads * spec.seq, "attention: lse size mismatch");
    let (t, hd, vd) = (spec.seq, spec.head_dim, spec.v_head_dim);
    let group = spec.q_heads / spec.kv_heads;
    let q_blocks = t.div_ceil(BLOCK);
    let (out_p, lse_p) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    (0..spec.batch * spec.q_heads * q_blocks).into_par_iter().for_each(|task| {
        let (bh, qb) = (task / q_blocks, task % q_blocks);
        let (b, h) = (bh / spec.q_heads, bh % spec.q_heads);
        let qv = HeadView::new(&spec, b, h, spec.q_heads, hd);
        let kv = HeadView::new(&spec, b, h / group, spec.kv_heads, hd);
        let vv = HeadView::new(&spec, b, h / group, spec.kv_heads, vd);
        let ov = HeadView::new(&spec, b, h, spec.q_heads, vd);
        let mask = Mask { segments: &segments[b * t..(b + 1) * t], window: spec.window };
        let (i0, i1) = (qb * BLOCK, ((qb + 1) * BLOCK).min(t));
        let bq = i1 - i0;

        let mut s = vec![0.0f32; BLOCK * BLOCK];
        let mut acc = vec![0.0f32; bq * vd];
        let mut row_max = vec![f32::NEG_INFINITY; bq];
        let mut row_sum = vec![0.0f32; bq];
        let mut j0 = mask.first_key(i0);
        while j0 < i1 {
            let bk = BLOCK.min(i1 - j0);
            if !mask.sees_block(i0..i1, j0..j0 + bk) {
                j0 += BLOCK;
                continue;
            }
            scores(
                &mut s,
                qv.rows(q.as_ptr(), i0),
                kv.rows_t(k.as_ptr(), j0),
                (i0, bq),
                (j0, bk),
                hd,
                spec.scale,
                &mask,
            );
            for r in 0..bq {
                let row = &mut s[r * BLOCK..r * BLOCK + bk];
                let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = row_max[r].max(block_max);
                if new_max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let correction = if row_max[r] == f32::NEG_INFINITY { 0.0 } else { fast_exp(row_max[r] - new_max) };
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = if *v == f32::NEG_INFINITY { 0.0 } else { fast_exp(*v - new_max) };
                    sum += *v;
                }
                row_sum[r] = row_sum[r] * correction + sum;
                row_max[r] = new_max;
                acc[r * vd..(r + 1) * vd].iter_mut().for_each(|a| *a *= correction);
            }
            // acc += P · V_block
            unsafe {
                gemm_strided(
                    bq,
                    vd,
                    bk,
                    Strided { ptr: acc.as_mut_ptr(), rs: vd as isize, cs: 1 },
                    true,
                    Strided { ptr: s.as_ptr(), rs: BLOCK as isize, cs: 1 },
                    vv.rows(v.as_ptr(), j0),
                    false,
                )
            };
            j0 += BLOCK;
        }
        for r in 0..bq {
            // The diagonal is always allowed, so every row has a positive sum.
            let inv = 1.0 / row_sum[r];
            let dst = unsafe { std::slice::from_raw_parts_mut(out_p.ptr().add(ov.base + (i0 + r) * ov.stride), vd) };
            dst.iter_mut().zip(&acc[r * vd..(r + 1) * vd]).for_each(|(o, a)| *o = a * inv);
            unsafe { *lse_p.ptr().add(bh * t + i0 + r) = row_max[r] + row_sum[r].ln() };
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    segments: &[i32],
    spec: Attention,
) {
    check_shapes(&spec, q.len(), k.len(), v.len(), segments.len());
    let out_len = spec.tokens() * spec.q_heads * spec.v_head_dim;
    assert!(
        dq.len() == q.len() && dout.len() == out_len && out.len() == out_len,
        "attention_backward: q-side size mismatch"
    );
    assert!(dk.len() == k.len() && dv.len() == v.len(), "attention_backward: kv-side size mismatch");
    let (t, hd, vd) = (spec.seq, spec.head_dim, spec.v_head_dim);
    let group = spec.q_heads / spec.kv_heads;
    let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    // One task per (batch row, kv head): it owns dk/dv of that head and dq of its query group.
    (0..spec.batch * spec.kv_heads).into_par_iter().for_each(|task| {
        let (b, kvh) = (task / spec.kv_heads, task % spec.kv_heads);
        let kv = HeadView::new(&spec, b, kvh, spec.kv_heads, hd);
        let vv = HeadView::new(&spec, b, kvh, spec.kv_heads, vd);
        let mask = Mask { segments: &segments[b * t..(b + 1) * t], window: spec.window };
        for i in 0..t {
            unsafe {
                std::slice::from_raw_parts_mut(dk_p.ptr().add(kv.base + i * kv.stride), hd).fill(0.0);
                std::slice::from_raw_parts_mut(dv_p.ptr().add(vv.base + i * vv.stride), vd).fill(0.0);
            }
        }
        let mut p = vec![0.0f32; BLOCK * BLOCK];
        let mut ds = vec![0.0f32; BLOCK * BLOCK];
        let mut d_row = vec![0.0f32; BLOCK];
        for h in kvh * group..(kvh + 1) * group {
            let qv = HeadView::new(&spec, b, h, spec.q_heads, hd);
            let ov = HeadView::new(&spec, b, h, spec.q_heads, vd);
            let lse = &lse[(b * spec.q_heads + h) * t..(b * spec.q_heads + h + 1) * t];
            for i in 0..t {
                unsafe { std::slice::from_raw_parts_mut(dq_p.ptr().add(qv.base + i * qv.stride), hd).fill(0.0) };
            }
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let bq = i1 - i0;
                for (r, d) in d_row[..bq].iter_mut().enumerate() {
                    let off = ov.base + (i0 + r) * ov.stride;
                    *d = dout[off..off + vd].iter().zip(&out[off..off + vd]).map(|(a, b)| a * b).sum();
                }
                let mut j0 = mask.first_key(i0);
                while j0 < i1 {
                    let bk = BLOCK.min(i1 - j0);
                    if !mask.sees_block(i0..i1, j0..j0 + bk) {
                        j0 += BLOCK;
                        continue;
                    }
                    scores(
                        &mut p,
                        qv.rows(q.as_ptr(), i0),
                        kv.rows_t(k.as_ptr(), j0),
                        (i0, bq),
                        (j0, bk),
                        hd,
                        spec.scale,
                        &mask,
                    );
                    for r in 0..bq {
                        for v in &mut p[r * BLOCK..r * BLOCK + bk] {
                            *v = if *v == f32::NEG_INFINITY { 0.0 } else { fast_exp(*v - lse[i0 + r]) };
                        }
                    }
                    let p_t = Strided { ptr: p.as_ptr(), rs: 1, cs: BLOCK as isize };
                    let ds_mat = Strided { ptr: ds.as_ptr(), rs: BLOCK as isize, cs: 1 };
                    let ds_t = Strided { ptr: ds.as_ptr(), rs: 1, cs: BLOCK as isize };
                    unsafe {
                        // dV_block += Pᵀ · dO
                        gemm_strided(bk, vd, bq, vv.rows_mut(dv_p, j0), true, p_t, ov.rows(dout.as_ptr(), i0), false);
                        // dP = dO · V_blockᵀ
                        let ds_out = Strided { ptr: ds.as_mut_ptr(), rs: BLOCK as isize, cs: 1 };
                        gemm_strided(
                            bq,
                            bk,
                            vd,
                            ds_out,
                            false,
                            ov.rows(dout.as_ptr(), i0),
                            vv.rows_t(v.as_ptr(), j0),
                            false,
                        );
                    }
                    for (r, &d) in d_row[..bq].iter().enumerate() {
                        let (ds, p) = (&mut ds[r * BLOCK..r * BLOCK + bk], &p[r * BLOCK..r * BLOCK + bk]);
                        for (ds, &p) in ds.iter_mut().zip(p) {
                            *ds = p * (*ds - d) * spec.scale;
                        }
                    }
                    unsafe {
                        // dQ_block += dS · K_block;  dK_block += dSᵀ · Q_block
                        gemm_strided(bq, hd, bk, qv.rows_mut(dq_p, i0), true, ds_mat, kv.rows(k.as_ptr(), j0), false);
                        gemm_strided(bk, hd, bq, kv.rows_mut(dk_p, j0), true, ds_t, qv.rows(q.as_ptr(), i0), false);
                    }
                    j0 += BLOCK;
                }
            }
        }
    });
}

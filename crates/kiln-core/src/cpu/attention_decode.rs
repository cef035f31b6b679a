//! Attention of new tokens over a key/value cache (decoding): for query i and head h, over its
//! cached rows j (its prompt's range, shared with the other sequences of that prompt, then its
//! own: see [`DecodeAttention`]),
//!   s_j = scale·q·k_j,  p_j = exp(s_j − max s) / Σ exp(s − max s),  o = Σ_j p_j v_j
//! computed exactly (two passes over the scores).
//!
//! Decode is bound by reading the cache, so a task owns one query and a block of its KV heads
//! (all of them when there are enough queries to keep every thread busy) and walks the cached
//! rows in order, each row's heads together: the reads stream through memory instead of
//! striding across it head by head. The dot products and the weighted sums of values run 16
//! lanes at a time (AVX-512 where the CPU has it; the compiler does not reliably vectorise a
//! dot product's reduction), the exponentials through [`fast_exp`]. A bf16 cache is widened to
//! f32 as it is read (exactly), so only memory traffic differs from an f32 one.

use super::kv_cache::{as_bf16, Stored};
use super::{has_avx512, Shared};
use crate::backend::{DecodeAttention, Precision};
use crate::fast_exp::fast_exp;
use crate::reduce;
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
    let caches = Caches { starts, lengths, spec };
    let vector = has_avx512();
    match spec.cache {
        Precision::F32 => caches.attend(out, q, k_cache, v_cache, vector),
        Precision::Bf16 => caches.attend(out, q, as_bf16(k_cache), as_bf16(v_cache), vector),
    }
}

/// Which cached rows each query attends, and the heads' shapes.
struct Caches<'a> {
    starts: &'a [i32],
    lengths: &'a [i32],
    spec: DecodeAttention,
}

/// One task's share: one query's vector `q` for its query heads `heads`, over the cache rows of
/// `ranges` (the prompt's, then its own).
struct Task<'a, T> {
    q: &'a [f32],
    k_cache: &'a [T],
    v_cache: &'a [T],
    ranges: [std::ops::Range<usize>; 2],
    heads: std::ops::Range<usize>,
    spec: DecodeAttention,
}

impl Caches<'_> {
    /// Attention of every query, with the AVX-512 row operations when `vector`.
    fn attend<T: Stored>(&self, out: &mut [f32], q: &[f32], k_cache: &[T], v_cache: &[T], vector: bool) {
        let spec = self.spec;
        let DecodeAttention { queries, q_heads, kv_heads, head_dim, v_head_dim, window, .. } = spec;
        assert!(
            kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
            "attention_decode: q heads must be a multiple of kv heads"
        );
        assert_eq!(q.len(), queries * q_heads * head_dim, "attention_decode: q size");
        assert_eq!(out.len(), queries * q_heads * v_head_dim, "attention_decode: out size");
        assert!(
            self.starts.len() == 2 * queries && self.lengths.len() == 2 * queries,
            "attention_decode: two starts and lengths per query"
        );
        let cache_rows = k_cache.len() / (kv_heads * head_dim);
        assert_eq!(
            v_cache.len() / (kv_heads * v_head_dim),
            cache_rows,
            "attention_decode: k and v caches differ in rows"
        );
        let group = q_heads / kv_heads;
        // KV heads per task: all of a query's, unless that leaves threads idle.
        let kv_per_task = if queries >= 2 * rayon::current_num_threads() { kv_heads } else { 1 };
        let blocks = kv_heads / kv_per_task;
        let out_ptr = Shared(out.as_mut_ptr());
        (0..queries * blocks).into_par_iter().for_each(|t| {
            let (i, block) = (t / blocks, t % blocks);
            let range = |r: usize| {
                let (start, len) = (self.starts[2 * i + r] as usize, self.lengths[2 * i + r] as usize);
                assert!(start + len <= cache_rows, "attention_decode: rows {start}..{} beyond the cache", start + len);
                start..start + len
            };
            let [mut prompt, mut own] = [range(0), range(1)];
            let len = prompt.len() + own.len();
            assert!(len > 0, "attention_decode: query {i} attends no rows");
            // A window drops the oldest rows: the prompt's first.
            let skip = window.map_or(0, |w| len.saturating_sub(w));
            own.start += skip.saturating_sub(prompt.len());
            prompt.start += skip.min(prompt.len());
            let heads = block * kv_per_task * group..(block + 1) * kv_per_task * group;
            // SAFETY: each task writes its own (query, heads) slice of `out`.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.ptr().add((i * q_heads + heads.start) * v_head_dim),
                    heads.len() * v_head_dim,
                )
            };
            let q = &q[(i * q_heads + heads.start) * head_dim..][..heads.len() * head_dim];
            let task = Task { q, k_cache, v_cache, ranges: [prompt, own], heads, spec };
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: the CPU has AVX-512 (checked by the caller).
                return unsafe { avx512::run(&task, o) };
            }
            task.run(o, dot, axpy);
        });
    }
}

impl<T: Stored> Task<'_, T> {
    /// `o` (this task's heads' outputs) from the row operations `dot` and `axpy`.
    #[inline(always)]
    fn run(&self, o: &mut [f32], dot: impl Fn(&[f32], &[T]) -> f32, axpy: impl Fn(&mut [f32], f32, &[T])) {
        let DecodeAttention { q_heads, kv_heads, head_dim, v_head_dim, scale, .. } = self.spec;
        let (k_row, v_row, group) = (kv_heads * head_dim, kv_heads * v_head_dim, q_heads / kv_heads);
        let rows = || self.ranges[0].clone().chain(self.ranges[1].clone());
        let n = self.ranges[0].len() + self.ranges[1].len();
        // weights[hh·n + j]: head `heads.start + hh` on the j-th attended row.
        let mut weights = vec![0f32; self.heads.len() * n];
        for (j, r) in rows().enumerate() {
            let k = &self.k_cache[r * k_row..][..k_row];
            for (hh, (h, q)) in self.heads.clone().zip(self.q.chunks_exact(head_dim)).enumerate() {
                weights[hh * n + j] = scale * dot(q, &k[h / group * head_dim..][..head_dim]);
            }
        }
        for w in weights.chunks_exact_mut(n) {
            let max = reduce::max(w);
            w.iter_mut().for_each(|s| *s = fast_exp(*s - max));
            let inv_sum = 1.0 / w.iter().sum::<f32>();
            w.iter_mut().for_each(|p| *p *= inv_sum);
        }
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, r) in rows().enumerate() {
            let v = &self.v_cache[r * v_row..][..v_row];
            for (hh, (h, o)) in self.heads.clone().zip(o.chunks_exact_mut(v_head_dim)).enumerate() {
                axpy(o, weights[hh * n + j], &v[h / group * v_head_dim..][..v_head_dim]);
            }
        }
    }
}

/// `Σ_i a_i·b_i`, sequentially.
fn dot<T: Stored>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (x, y)| x.mul_add(y.widen(), s))
}

/// `o += p·v`.
fn axpy<T: Stored>(o: &mut [f32], p: f32, v: &[T]) {
    for (o, v) in o.iter_mut().zip(v) {
        *o = p.mul_add(v.widen(), *o);
    }
}

/// The row operations 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Stored, Task};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run<T: Stored>(task: &Task<T>, o: &mut [f32]) {
        task.run(o, |a, b| unsafe { dot(a, b) }, |o, p, v| unsafe { axpy(o, p, v) });
    }

    /// 16 stored values from `p`, widened.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<T: Stored>(p: *const T) -> __m512 {
        if T::BF16 {
            let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }

    /// `Σ_i a_i·b_i` in 16 partial sums, then their total.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot<T: Stored>(a: &[f32], b: &[T]) -> f32 {
        let whole = a.len() / 16 * 16;
        let mut sums = _mm512_setzero_ps();
        for i in (0..whole).step_by(16) {
            sums = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), load16(b.as_ptr().add(i)), sums);
        }
        _mm512_reduce_add_ps(sums) + super::dot(&a[whole..], &b[whole..])
    }

    /// `o += p·v`, 16 lanes at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn axpy<T: Stored>(o: &mut [f32], p: f32, v: &[T]) {
        let whole = o.len() / 16 * 16;
        let pv = _mm512_set1_ps(p);
        for i in (0..whole).step_by(16) {
            let at = o.as_mut_ptr().add(i);
            _mm512_storeu_ps(at, _mm512_fmadd_ps(pv, load16(v.as_ptr().add(i)), _mm512_loadu_ps(at)));
        }
        super::axpy(&mut o[whole..], p, &v[whole..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The AVX-512 rows agree with the portable ones (the conformance suite checks whichever
    /// this CPU runs against full attention).
    #[test]
    fn vector_rows_match_portable_rows() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut rng = Rng::new(5);
        let (queries, q_heads, kv_heads, head_dim, v_head_dim, rows) = (3, 4, 2, 40, 24, 30);
        let spec = DecodeAttention {
            queries,
            q_heads,
            kv_heads,
            head_dim,
            v_head_dim,
            scale: 0.3,
            window: Some(7),
            cache: Precision::F32,
        };
        let q = rng.normal_vec(queries * q_heads * head_dim, 1.0);
        let k = rng.normal_vec(rows * kv_heads * head_dim, 1.0);
        let v = rng.normal_vec(rows * kv_heads * v_head_dim, 1.0);
        // Query 0 with its prompt only, 1 without one, 2 with both (its window reaching back
        // into its prompt).
        let (starts, lengths) = ([0, 0, 0, 10, 3, 22], [30, 0, 0, 5, 4, 5]);
        let caches = Caches { starts: &starts, lengths: &lengths, spec };
        let mut outs = [true, false].map(|vector| {
            let mut out = vec![0f32; queries * q_heads * v_head_dim];
            caches.attend(&mut out, &q, &k, &v, vector);
            out
        });
        let [vector, portable] = &mut outs;
        for (a, b) in vector.iter().zip(portable.iter()) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
        }
    }
}

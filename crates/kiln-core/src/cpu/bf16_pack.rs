//! Packing f32 operands into the bf16 panels of the bf16 matrix products.
//!
//! A panel holds `width` vectors (rows of A, or columns of B) as k-pairs: `u32`s with
//! `bf16(x[2q])` in the low half and `bf16(x[2q+1])` in the high half, rounded to nearest
//! with ties to even ([`crate::bf16::round`]), zero past the edges. Where AVX-512 is present,
//! whole blocks of 16 vectors × 16 pairs are rounded 16 lanes at a time (the same integer
//! arithmetic as `round`, so the panels are the same bits either way) and transposed in
//! registers when the source runs the other way from the panel; the rest goes element by
//! element.

use super::{has_avx512, Shared};
use crate::bf16::round;

/// Pairs rounded at a time when a vector's k values are contiguous (on the stack).
const ROUND_CHUNK: usize = 256;
/// The side of a block packed with vectors: 16 lanes × 16 pairs.
const BLOCK: usize = 16;

/// How a set of vectors is packed: panels of `width` vectors, each `pairs` k-pairs long (the
/// pairs past `k` zero), in one of the [`Layout`]s.
#[derive(Clone, Copy)]
pub(super) struct Panels {
    pub width: usize,
    pub pairs: usize,
    pub layout: Layout,
}

/// The order of a panel's pairs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Layout {
    /// `[pair][lane]`: one pair of every lane together, for the vector kernels.
    PairMajor,
    /// AMX tiles of 16 × 16 pairs, 1 KiB each and stored whole, a step of 16 pairs of the
    /// panel's 32 lanes after another: `[step][lane / 16][lane % 16][pair % 16]` (A's tiles,
    /// a row of C per tile row) or `[step][lane / 16][pair % 16][lane % 16]` (B's, a pair per
    /// tile row).
    TileRowsAreLanes,
    TileRowsArePairs,
}

impl Panels {
    /// Where lane `i`'s pair `q` lies in its panel.
    #[inline(always)]
    fn at(self, q: usize, i: usize) -> usize {
        const T: usize = 16;
        match self.layout {
            Layout::PairMajor => q * self.width + i,
            Layout::TileRowsAreLanes => (q / T) * T * self.width + (i / T) * T * T + (i % T) * T + q % T,
            Layout::TileRowsArePairs => (q / T) * T * self.width + (i / T) * T * T + (q % T) * T + i % T,
        }
    }

    /// Whether 16 consecutive lanes of one pair are contiguous (else 16 pairs of one lane are).
    fn lanes_contiguous(self) -> bool {
        self.layout != Layout::TileRowsAreLanes
    }
}

/// Packs `count` vectors of `k` values (element `(t, kk)` at `src + t·st + kk·sk`) into
/// `panels`: panel `p`, pair `q`, lane `i` holds `bf16(x[pw+i, 2q]) | bf16(x[pw+i, 2q+1]) <<
/// 16`, zero beyond the edges. The loops run along whichever index is contiguous in memory,
/// so memory is read in long runs; tasks take several panels each.
///
/// # Safety
/// `src` must be valid for every element the strides reach; `dst` must hold the panels.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pack(
    dst: &mut [u32],
    panels: Panels,
    count: usize,
    k: usize,
    src: *const f32,
    st: isize,
    sk: isize,
    parallel: bool,
) {
    pack_with(dst, panels, count, k, src, st, sk, parallel, has_avx512());
}

/// [`pack`], with the vector blocks or without.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_with(
    dst: &mut [u32],
    panels: Panels,
    count: usize,
    k: usize,
    src: *const f32,
    st: isize,
    sk: isize,
    parallel: bool,
    vector: bool,
) {
    let (width, pairs, real_pairs) = (panels.width, panels.pairs, k.div_ceil(2));
    let panel_len = pairs * width;
    let panel_count = count.div_ceil(width);
    let per_task = if parallel { panel_count.div_ceil(4 * rayon::current_num_threads()) } else { panel_count };
    // A block spans 16 lanes, or all of a narrower pair-major panel's.
    let block_lanes = width.min(BLOCK);
    let vector = vector && (width.is_multiple_of(BLOCK) || panels.layout == Layout::PairMajor) && (sk == 1 || st == 1);
    let src = Shared(src as *mut f32);
    let task = |(g, dst): (usize, &mut [u32])| {
        let lanes = |p: usize| (count - p * width).min(width);
        // The lanes and pairs of panel p that whole blocks cover.
        let blocked = |p: usize| {
            if vector {
                (lanes(p) / block_lanes * block_lanes, k / (2 * BLOCK) * BLOCK)
            } else {
                (0, 0)
            }
        };
        let first = g * per_task;
        let vectors = |p: usize| unsafe { src.ptr().offset((p * width) as isize * st) };
        #[cfg(target_arch = "x86_64")]
        for (p, dst) in (first..).zip(dst.chunks_exact_mut(panel_len)) {
            let (lanes, pairs) = blocked(p);
            if lanes > 0 && pairs > 0 {
                unsafe { blocks::pack(dst, panels, block_lanes, lanes, pairs, vectors(p), st, sk) };
            }
        }
        if sk == 1 {
            // Each vector's k values are contiguous: round a run of them into pairs, then lay
            // the pairs out lane by lane.
            let mut rounded = [0u32; ROUND_CHUNK];
            for (p, dst) in (first..).zip(dst.chunks_exact_mut(panel_len)) {
                let (blocked_lanes, blocked_pairs) = blocked(p);
                for i in 0..lanes(p) {
                    let skip = if i < blocked_lanes { blocked_pairs } else { 0 };
                    let x = unsafe { std::slice::from_raw_parts(vectors(p).offset(i as isize * st), k) };
                    for (chunk, x) in x[2 * skip..].chunks(2 * ROUND_CHUNK).enumerate() {
                        let rounded = &mut rounded[..x.len().div_ceil(2)];
                        let (whole, tail) = x.split_at(x.len() & !1);
                        for (r, two) in rounded.iter_mut().zip(whole.chunks_exact(2)) {
                            *r = pair(two[0], two[1]);
                        }
                        if let [last] = tail {
                            rounded[whole.len() / 2] = round(*last) as u32;
                        }
                        for (q, &r) in (skip + chunk * ROUND_CHUNK..).zip(rounded.iter()) {
                            dst[panels.at(q, i)] = r;
                        }
                    }
                }
            }
        } else if st == 1 {
            // The vectors are contiguous for each k: two rows of k make one row of pairs, read
            // across all the task's panels.
            for q in 0..real_pairs {
                for (p, dst) in (first..).zip(dst.chunks_exact_mut(panel_len)) {
                    let (blocked_lanes, blocked_pairs) = blocked(p);
                    let from = if q < blocked_pairs { blocked_lanes } else { 0 };
                    let row = |kk: usize| unsafe {
                        std::slice::from_raw_parts(vectors(p).offset(kk as isize * sk), lanes(p))
                    };
                    if 2 * q + 1 < k {
                        for (i, (&even, &odd)) in row(2 * q).iter().zip(row(2 * q + 1)).enumerate().skip(from) {
                            dst[panels.at(q, i)] = pair(even, odd);
                        }
                    } else {
                        for (i, &even) in row(2 * q).iter().enumerate().skip(from) {
                            dst[panels.at(q, i)] = round(even) as u32;
                        }
                    }
                }
            }
        } else {
            for (p, dst) in (first..).zip(dst.chunks_exact_mut(panel_len)) {
                let at = |i: usize, kk: usize| unsafe { *vectors(p).offset(i as isize * st + kk as isize * sk) };
                for q in 0..real_pairs {
                    for i in 0..lanes(p) {
                        let odd = if 2 * q + 1 < k { at(i, 2 * q + 1) } else { 0.0 };
                        dst[panels.at(q, i)] = pair(at(i, 2 * q), odd);
                    }
                }
            }
        }
        // Zeros: the lanes past the last vector, and the pairs past k.
        for (p, dst) in (first..).zip(dst.chunks_exact_mut(panel_len)) {
            for q in 0..pairs {
                let from = if q < real_pairs { lanes(p) } else { 0 };
                for i in from..width {
                    dst[panels.at(q, i)] = 0;
                }
            }
        }
    };
    if panel_len == 0 {
        return;
    }
    if parallel {
        use rayon::prelude::*;
        dst.par_chunks_mut(per_task * panel_len).enumerate().for_each(task);
    } else {
        dst.chunks_mut(per_task * panel_len).enumerate().for_each(task);
    }
}

#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    round(even) as u32 | (round(odd) as u32) << 16
}

/// Whole 16 × 16 blocks with AVX-512.
#[cfg(target_arch = "x86_64")]
mod blocks {
    use super::{Panels, BLOCK};
    use std::arch::x86_64::*;

    /// Packs lanes `0..lanes` (a multiple of `block_lanes`: 16, or a narrower pair-major
    /// panel's width) and pairs `0..pairs` (a multiple of 16) of one panel whose vectors start
    /// at `src`; `sk == 1` or `st == 1`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack(
        dst: &mut [u32],
        panels: Panels,
        block_lanes: usize,
        lanes: usize,
        pairs: usize,
        src: *const f32,
        st: isize,
        sk: isize,
    ) {
        // The block's lanes among a register's 16.
        let mask: __mmask16 = if block_lanes == BLOCK { !0 } else { (1 << block_lanes) - 1 };
        for i0 in (0..lanes).step_by(block_lanes) {
            for q0 in (0..pairs).step_by(BLOCK) {
                // `rows` holds the block lane by lane (rows[i] = 16 pairs of lane i0 + i) when
                // each vector's k values are contiguous, else pair by pair.
                let mut rows = [_mm512_setzero_si512(); BLOCK];
                let by_lane = sk == 1;
                if by_lane {
                    for (i, row) in rows.iter_mut().enumerate().take(block_lanes) {
                        let x = src.offset((i0 + i) as isize * st + 2 * q0 as isize);
                        let (lo, hi) = (round16(_mm512_loadu_ps(x)), round16(_mm512_loadu_ps(x.add(16))));
                        let (lo, hi) = (_mm512_cvtepi32_epi16(lo), _mm512_cvtepi32_epi16(hi));
                        *row = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    }
                } else {
                    for (q, row) in rows.iter_mut().enumerate() {
                        let even = src.offset(2 * (q0 + q) as isize * sk + i0 as isize);
                        let (even, odd) =
                            (_mm512_maskz_loadu_ps(mask, even), _mm512_maskz_loadu_ps(mask, even.offset(sk)));
                        *row = _mm512_or_si512(round16(even), _mm512_slli_epi32::<16>(round16(odd)));
                    }
                }
                if by_lane == panels.lanes_contiguous() {
                    transpose(&mut rows);
                }
                for (r, row) in rows.iter().enumerate() {
                    if panels.lanes_contiguous() {
                        let at = dst.as_mut_ptr().add(panels.at(q0 + r, i0));
                        _mm512_mask_storeu_epi32(at as *mut _, mask, *row);
                    } else if r < block_lanes {
                        _mm512_storeu_si512(dst.as_mut_ptr().add(panels.at(q0, i0 + r)) as *mut _, *row);
                    }
                }
            }
        }
    }

    /// `bf16::round` of 16 values, each in the low half of a 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round16(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let high = _mm512_srli_epi32::<16>(bits);
        let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)))
    }

    /// Transposes a 16 × 16 block of 32-bit values in place: 32-bit and 64-bit interleaves
    /// within 128-bit lanes, then two rounds of 128-bit lane shuffles.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(rows: &mut [__m512i; BLOCK]) {
        let r = *rows;
        let mut t = [_mm512_setzero_si512(); BLOCK];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+4.
        let mut u = [_mm512_setzero_si512(); BLOCK];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for j in 0..4 {
            let low = |a: __m512i, b: __m512i| _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b);
            let high = |a: __m512i, b: __m512i| _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b);
            let (x0, x1) = (low(u[j], u[4 + j]), low(u[8 + j], u[12 + j]));
            let (y0, y1) = (high(u[j], u[4 + j]), high(u[8 + j], u[12 + j]));
            rows[j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(x0, x1);
            rows[4 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(x0, x1);
            rows[8 + j] = _mm512_shuffle_i32x4::<0b10_00_10_00>(y0, y1);
            rows[12 + j] = _mm512_shuffle_i32x4::<0b11_01_11_01>(y0, y1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The vector blocks write the same panels, bit for bit, as the element-by-element path,
    /// for every layout, both contiguous directions, edges and NaN/infinity/ties.
    #[test]
    fn vector_blocks_pack_what_the_scalar_path_packs() {
        if !has_avx512() {
            eprintln!("this CPU has no AVX-512: only the scalar path runs here");
            return;
        }
        let mut rng = Rng::new(9);
        for (width, layout) in [
            (12, Layout::PairMajor),
            (32, Layout::PairMajor),
            (32, Layout::TileRowsAreLanes),
            (32, Layout::TileRowsArePairs),
        ] {
            for (count, k) in [(32usize, 32usize), (70, 100), (16, 33), (45, 64)] {
                let mut x: Vec<f32> = (0..count * k).map(|_| rng.normal() as f32).collect();
                x[3] = f32::NAN;
                x[40] = f32::INFINITY;
                x[77] = 1.0 + 2f32.powi(-8);
                let pairs = k.div_ceil(2).next_multiple_of(16);
                let panels = Panels { width, pairs, layout };
                let len = count.div_ceil(width) * width * pairs;
                // Vectors contiguous in k (st = k, sk = 1) and across vectors (st = 1, sk = count).
                for (st, sk, what) in [(k as isize, 1, "by vector"), (1, count as isize, "by k")] {
                    let data: Vec<f32> = if sk == 1 {
                        x.clone()
                    } else {
                        (0..count * k).map(|e| x[(e % count) * k + e / count]).collect()
                    };
                    let (mut scalar, mut vector) = (vec![7u32; len], vec![9u32; len]);
                    unsafe {
                        pack_with(&mut scalar, panels, count, k, data.as_ptr(), st, sk, false, false);
                        pack_with(&mut vector, panels, count, k, data.as_ptr(), st, sk, true, true);
                    }
                    assert!(scalar == vector, "{layout:?} {count}x{k} {what}");
                }
            }
        }
    }
}

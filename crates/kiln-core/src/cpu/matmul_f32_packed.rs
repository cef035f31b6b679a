//! f32 products against a weight packed once, for decode while the weights are frozen
//! ([`super::frozen_weights`]): a decode step multiplies each weight by a few dozen rows, and
//! the `gemm` crate packs the whole weight on every call, which cost as much as the product.
//!
//! `C[m,n] (+)= A[m,k] · B[k,n]`: every element is one chain of fused multiply-adds over k in
//! order, `c ← fma(A[i,l], B[l,j], c)` for l = 0, 1, …, starting from C's old value or 0; the
//! chain is cut into passes of `KC` that store and reload the accumulator exactly, so a row's
//! values do not depend on the shape, the blocking or the threads.
//!
//! Layout: B in panels of `NR` columns, each `k` rows of `NR` contiguous values, zero-padded
//! past `n`. A is read in place (a decode's A is small and already in cache): a micro-kernel
//! keeps an `MR × NR` tile of C in 24 AVX-512 registers and broadcasts A's values from memory.
//! Tasks are blocks of `MC` rows by `NC` columns, shared out over rayon's threads. Only CPUs
//! with AVX-512 take this path; elsewhere products keep packing through `gemm`.

use super::matmul::{Strided, PARALLEL_MIN_MACS};
use super::Shared;

/// Rows of a C tile.
const MR: usize = 12;
/// Columns of a B panel and of a C tile: two 16-lane vectors.
const NR: usize = 32;
/// k per pass over a tile: a B micro-panel of `KC·NR` values is 32 KiB, in L1.
const KC: usize = 256;
/// Rows and columns of C per task.
const MC: usize = 8 * MR;
const NC: usize = 8 * NR;

/// A weight `B[k, n]` packed into panels of `NR` columns.
pub(crate) struct PackedF32 {
    panels: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedF32 {
    /// Whether this CPU runs the packed kernel.
    pub(crate) fn available() -> bool {
        super::has_avx512()
    }

    /// Packs `B[k, n]`.
    ///
    /// # Safety
    /// `b` must be valid for every element its strides reach.
    pub(crate) unsafe fn new(n: usize, k: usize, b: Strided<*const f32>) -> Self {
        use rayon::prelude::*;
        let mut panels = vec![0.0; n.div_ceil(NR) * NR * k];
        let src = Shared(b.ptr as *mut f32);
        panels.par_chunks_mut(NR * k.max(1)).enumerate().for_each(|(p, panel)| {
            let cols = (n - p * NR).min(NR);
            // SAFETY: (l, p·NR + j) is inside B, as the caller promises.
            let at =
                |l: usize, j: usize| unsafe { *src.ptr().offset(l as isize * b.rs + (p * NR + j) as isize * b.cs) };
            // Read B along its contiguous direction: a weight stored as [n, k] runs along k.
            if b.rs == 1 {
                for j in 0..cols {
                    (0..k).for_each(|l| panel[l * NR + j] = at(l, j));
                }
            } else {
                for l in 0..k {
                    (0..cols).for_each(|j| panel[l * NR + j] = at(l, j));
                }
            }
        });
        Self { panels, n, k }
    }
}

/// `C[m,n] (+)= A[m,k] · B[k,n]` with B packed; C's rows must be contiguous (`c.cs == 1`).
///
/// # Safety
/// Every pointer must be valid for the extents its strides reach, and `c` must not alias
/// `a` or `b`.
pub(crate) unsafe fn gemm_f32_packed_b(
    m: usize,
    c: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: &PackedF32,
    parallel: bool,
) {
    let (n, k) = (b.n, b.k);
    assert_eq!(c.cs, 1, "packed f32 product: C's rows must be contiguous");
    if m == 0 || n == 0 {
        return;
    }
    let (cp, ap) = (Shared(c.ptr), Shared(a.ptr as *mut f32));
    let column_blocks = n.div_ceil(NC);
    let task = |block: usize| {
        let (rows, cols) = (block / column_blocks * MC, block % column_blocks * NC);
        let c = Strided { ptr: cp.ptr(), ..c };
        let a = Strided { ptr: ap.ptr() as *const f32, ..a };
        // SAFETY: the caller's operands hold the block; tasks own disjoint blocks of C.
        unsafe { compute_block((rows, (m - rows).min(MC)), (cols, (n - cols).min(NC)), k, a, &b.panels, c, accumulate) }
    };
    let blocks = m.div_ceil(MC) * column_blocks;
    if parallel && m * n * k >= PARALLEL_MIN_MACS {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(task);
    } else {
        (0..blocks).for_each(task);
    }
}

/// C's rows `rows.0 .. rows.0 + rows.1` and columns `cols.0 .. cols.0 + cols.1`, over all k.
unsafe fn compute_block(
    rows: (usize, usize),
    cols: (usize, usize),
    k: usize,
    a: Strided<*const f32>,
    panels: &[f32],
    c: Strided<*mut f32>,
    accumulate: bool,
) {
    for k0 in (0..k.max(1)).step_by(KC) {
        let kc = (k - k0).min(KC);
        // The tile continues from C after the first pass, or from C's old values when asked.
        let load = accumulate || k0 > 0;
        for j0 in (cols.0..cols.0 + cols.1).step_by(NR) {
            let b = panels.as_ptr().add(j0 * k + k0 * NR);
            let nr = (cols.0 + cols.1 - j0).min(NR);
            for i0 in (rows.0..rows.0 + rows.1).step_by(MR) {
                let tile = Tile {
                    a: a.ptr.offset(i0 as isize * a.rs + k0 as isize * a.cs),
                    a_rs: a.rs,
                    a_cs: a.cs,
                    b,
                    c: c.ptr.offset(i0 as isize * c.rs + j0 as isize),
                    c_rs: c.rs,
                    columns: nr,
                    kc,
                    load,
                };
                tile.run((rows.0 + rows.1 - i0).min(MR));
            }
        }
    }
}

/// One micro-kernel call: up to `MR` rows of C by `columns` (≤ `NR`) from `kc` values of k.
struct Tile {
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    c: *mut f32,
    c_rs: isize,
    columns: usize,
    kc: usize,
    load: bool,
}

impl Tile {
    /// Runs the kernel for `rows` rows.
    unsafe fn run(&self, rows: usize) {
        macro_rules! by_rows {
            ($($r:literal)*) => {
                match rows {
                    $($r => self.kernel::<$r>(),)*
                    _ => unreachable!("a tile has 1 to {MR} rows"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let lanes = |from: usize| -> u16 {
            let n = self.columns.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as u16
        };
        let (mask0, mask1) = (lanes(0), lanes(16));
        let row = |i: usize| self.c.offset(i as isize * self.c_rs);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if self.load {
            for (i, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm512_maskz_loadu_ps(mask0, row(i));
                acc[1] = _mm512_maskz_loadu_ps(mask1, row(i).add(16));
            }
        }
        for q in 0..self.kc {
            let b0 = _mm512_loadu_ps(self.b.add(q * NR));
            let b1 = _mm512_loadu_ps(self.b.add(q * NR + 16));
            let a = self.a.offset(q as isize * self.a_cs);
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.offset(i as isize * self.a_rs));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(row(i), mask0, acc[0]);
            _mm512_mask_storeu_ps(row(i).add(16), mask1, acc[1]);
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn kernel<const R: usize>(&self) {
        unreachable!("the packed f32 kernel runs only where PackedF32::available()")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    /// Against f64 sums, within the bound of a k-term f32 chain (γ_k·Σ|a·b|), for shapes with
    /// edges in every direction, transposed operands and accumulation; and each row equal, bit
    /// for bit, to the same row computed alone.
    #[test]
    fn packed_products_are_within_f32_bounds_and_rows_do_not_depend_on_the_batch() {
        if !PackedF32::available() {
            eprintln!("this CPU has no AVX-512: the packed f32 kernel does not run here");
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 3), (12, 32, 256), (13, 33, 257), (64, 300, 700), (100, 513, 64)] {
            for (ta, tb, acc) in [(false, true, false), (true, false, true), (false, false, true)] {
                let (a, b, c0) = (random(m * k, &mut rng), random(k * n, &mut rng), random(m * n, &mut rng));
                let a_at = |rows: usize| {
                    let (rs, cs) = if ta { (1, rows as isize) } else { (k as isize, 1) };
                    move |p: *const f32| Strided { ptr: p, rs, cs }
                };
                let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
                let packed = unsafe { PackedF32::new(n, k, Strided { ptr: b.as_ptr(), rs: b_rs, cs: b_cs }) };
                let mut c = c0.clone();
                let cs = Strided { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 };
                unsafe { gemm_f32_packed_b(m, cs, acc, a_at(m)(a.as_ptr()), &packed, true) };
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let gamma = (k + 1) as f64 * 2f64.powi(-24) / (1.0 - (k + 1) as f64 * 2f64.powi(-24));
                for i in 0..m {
                    for j in 0..n {
                        let start = if acc { c0[i * n + j] as f64 } else { 0.0 };
                        let (mut exact, mut magnitude) = (start, start.abs());
                        for l in 0..k {
                            exact += at(i, l) as f64 * bt(l, j) as f64;
                            magnitude += (at(i, l) as f64 * bt(l, j) as f64).abs();
                        }
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= gamma * magnitude,
                            "({m},{n},{k}) ta={ta} tb={tb} acc={acc} at ({i},{j}): {got} vs {exact}"
                        );
                    }
                }
                if ta {
                    continue;
                }
                for row in [0, m / 2, m - 1] {
                    let mut one: Vec<f32> = c0[row * n..(row + 1) * n].to_vec();
                    let cs = Strided { ptr: one.as_mut_ptr(), rs: n as isize, cs: 1 };
                    unsafe { gemm_f32_packed_b(1, cs, acc, a_at(1)(a[row * k..].as_ptr()), &packed, false) };
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&one), bits(&c[row * n..(row + 1) * n]), "({m},{n},{k}) row {row}");
                }
            }
        }
    }
}

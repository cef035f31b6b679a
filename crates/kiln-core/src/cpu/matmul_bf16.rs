//! Matrix products with bf16 inputs and f32 accumulation, as mixed precision computes them.
//!
//! `C[m,n] (+)= Σ_k bf16(A[m,k]) · bf16(B[k,n])`: each operand is rounded to bfloat16 (to
//! nearest, ties to even) as it is packed; the products of two bf16 values are exact in f32
//! and the sums are f32. k is taken in pairs. Three micro-kernels, one chosen per process:
//! AMX (`tdpbf16ps` on tile registers, see [`super::amx`]) where the CPU has it; else
//! AVX512-BF16, whose `vdpbf16ps` adds, for element (i, j), `A[i,2p+1]·B[2p+1,j]` and then
//! `A[i,2p]·B[2p,j]`, each addition rounded to f32; else a portable kernel that computes the
//! same sequence as `vdpbf16ps` (with denormals flushed to zero, as kiln's threads set
//! FTZ/DAZ and the instruction always does, the two agree bit for bit). Whatever the kernel,
//! every element of C sees the same operations in the same order whatever the shape, the
//! blocking or the number of threads: a rollout's decode and a training forward give the same
//! bits for the same row.
//!
//! Layout (GotoBLAS/BLIS): A is packed in panels of `mr` rows and B in panels of `NR`
//! columns, each a sequence of k-pairs (`u32`: the even k in the low half, the odd k in the
//! high half), zero-padded at the edges: pair-major (the lanes of a pair together) for the
//! vector kernels, in whole AMX tiles for AMX (see [`Layout`]), whose pairs are padded to
//! whole tile steps with zeros (adding `0·0` leaves a sum as it is). C is computed in tiles of `mr × NR` by a micro-kernel
//! that keeps the tile in registers for `KC` pairs at a time; tasks are blocks of `8·mr` rows
//! by `NC` columns, shared out over rayon's threads.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
use super::amx;
use super::bf16_pack::{pack, Layout, Panels};
use super::matmul::{Strided, PARALLEL_MIN_MACS};
use super::Shared;
use std::cell::RefCell;

/// Rows of A per panel and of a C tile, for the vector kernels.
const MR: usize = 12;
/// The most rows of any kernel's C tile (AMX's).
const MAX_MR: usize = 32;
/// Columns of B per panel and of a C tile: two 16-lane vectors, or two tiles.
const NR: usize = 32;
/// k-pairs per pass of the vector micro-kernels: a B micro-panel of `KC·NR` pairs is 16 KiB.
const KC: usize = 128;
/// Columns of C per task (rows: `8·mr`).
const NC: usize = 8 * NR;
/// A cache line's pairs: packed panels start on one (their lengths are whole lines).
const ALIGN: usize = 16;

thread_local! {
    /// Packed operands, kept between calls so products do not allocate.
    static PACKED_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `f(buf)` with `len` elements of a scratch buffer starting on a cache line. The buffer is
/// taken from `cell`, not borrowed: a product nested in this one (rayon runs other tasks
/// while it waits) finds the cell empty and uses a buffer of its own.
fn with_scratch<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    let mut buf = cell.with(|p| p.take());
    let r = f(aligned(&mut buf, len));
    cell.with(|p| {
        if p.borrow().len() < buf.len() {
            p.replace(buf);
        }
    });
    r
}

/// `len` elements of `buf`, grown as needed, starting on a cache line (a tile row split over
/// two lines loads at half speed).
fn aligned(buf: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if buf.len() < len + ALIGN {
        buf.resize(len + ALIGN, 0);
    }
    let start = buf.as_ptr().align_offset(4 * ALIGN);
    &mut buf[start..start + len]
}

/// The B operand of a product, `n` vectors of `k`, packed once for this CPU's kernel: a
/// weight reused by many products (decode) skips its packing.
pub(crate) struct PackedB {
    buf: Vec<u32>,
    n: usize,
    k: usize,
}

impl PackedB {
    /// Packs `B[k, n]`.
    ///
    /// # Safety
    /// `b` must be valid for every element its strides reach.
    pub(crate) unsafe fn new(n: usize, k: usize, b: Strided<*const f32>) -> Self {
        let kernel = Kernel::detect();
        let mut buf = Vec::new();
        pack_b(kernel, aligned(&mut buf, b_len(kernel, n, k)), n, k, b, true);
        Self { buf, n, k }
    }

    fn panels(&self) -> &[u32] {
        let kernel = Kernel::detect();
        let start = self.buf.as_ptr().align_offset(4 * ALIGN);
        &self.buf[start..start + b_len(kernel, self.n, self.k)]
    }
}

/// k-pairs of a panel: `k` halved, padded to the kernel's step.
fn pairs(kernel: Kernel, k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(kernel.pair_step())
}

/// Elements of B's panels.
fn b_len(kernel: Kernel, n: usize, k: usize) -> usize {
    n.div_ceil(NR) * NR * pairs(kernel, k)
}

/// B as "n vectors of k" with strides (cs, rs), into panels of `NR`.
unsafe fn pack_b(kernel: Kernel, dst: &mut [u32], n: usize, k: usize, b: Strided<*const f32>, parallel: bool) {
    let layout = kernel.layouts().1;
    pack(dst, Panels { width: NR, pairs: pairs(kernel, k), layout }, n, k, b.ptr, b.cs, b.rs, parallel);
}

/// `C[m,n] (+)= bf16(A[m,k]) · bf16(B[k,n])` on strided f32 operands.
///
/// # Safety
/// Every pointer must be valid for the extents its strides reach, and `c` must not alias
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_strided(
    m: usize,
    n: usize,
    k: usize,
    c: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallel = parallel && m * n * k >= PARALLEL_MIN_MACS;
    let kernel = Kernel::detect();
    with_scratch(&PACKED_B, b_len(kernel, n, k), |pb| {
        pack_b(kernel, pb, n, k, b, parallel);
        product(kernel, (m, n, k), c, accumulate, a, pb, parallel);
    });
}

/// [`gemm_bf16_strided`] with B packed already.
///
/// # Safety
/// As [`gemm_bf16_strided`].
pub(crate) unsafe fn gemm_bf16_packed_b(
    m: usize,
    c: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: &PackedB,
    parallel: bool,
) {
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return;
    }
    let parallel = parallel && m * n * k >= PARALLEL_MIN_MACS;
    product(Kernel::detect(), (m, n, k), c, accumulate, a, b.panels(), parallel);
}

/// Packs A and computes C from the packed panels of both, in tasks of `8·mr` rows by `NC`
/// columns.
unsafe fn product(
    kernel: Kernel,
    (m, n, k): (usize, usize, usize),
    c: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    pb: &[u32],
    parallel: bool,
) {
    let (mr, pairs) = (kernel.mr(), pairs(kernel, k));
    with_scratch(&PACKED_A, m.div_ceil(mr) * mr * pairs, |pa| {
        // A as "m vectors of k" with strides (rs, cs).
        pack(pa, Panels { width: mr, pairs, layout: kernel.layouts().0 }, m, k, a.ptr, a.rs, a.cs, parallel);
        let (pa, cp) = (&*pa, Shared(c.ptr));
        let mc = 8 * mr;
        let task = |block: usize| {
            let (rows, cols) = (block / n.div_ceil(NC) * mc, block % n.div_ceil(NC) * NC);
            let c = Strided { ptr: cp.ptr(), rs: c.rs, cs: c.cs };
            compute_block(kernel, (rows, (m - rows).min(mc)), (cols, (n - cols).min(NC)), pairs, pa, pb, c, accumulate);
        };
        let blocks = m.div_ceil(mc) * n.div_ceil(NC);
        if parallel {
            use rayon::prelude::*;
            (0..blocks).into_par_iter().for_each(task);
        } else {
            (0..blocks).for_each(task);
        }
    });
}

/// C's rows `rows.0 .. rows.0 + rows.1` and columns `cols.0 .. cols.0 + cols.1`, all of k
/// (`pairs`, as packed).
#[allow(clippy::too_many_arguments)]
fn compute_block(
    kernel: Kernel,
    rows: (usize, usize),
    cols: (usize, usize),
    pairs: usize,
    pa: &[u32],
    pb: &[u32],
    c: Strided<*mut f32>,
    accumulate: bool,
) {
    let mr = kernel.mr();
    let mut tile = [0f32; MAX_MR * NR];
    let kc_max = kernel.kc();
    for k0 in (0..pairs.max(1)).step_by(kc_max) {
        let kc = (pairs - k0).min(kc_max);
        // The tile continues from C after the first pass, or from C's old values when asked.
        let load = accumulate || k0 > 0;
        for j0 in (cols.0..cols.0 + cols.1).step_by(NR) {
            let b = &pb[(j0 / NR) * NR * pairs + k0 * NR..];
            let nr = (cols.0 + cols.1 - j0).min(NR);
            for i0 in (rows.0..rows.0 + rows.1).step_by(mr) {
                let a = &pa[(i0 / mr) * mr * pairs + k0 * mr..];
                let rows_here = (rows.0 + rows.1 - i0).min(mr);
                // SAFETY: the caller's C holds every element of the block; tasks own disjoint blocks.
                unsafe {
                    let corner = c.ptr.offset(i0 as isize * c.rs + j0 as isize * c.cs);
                    if rows_here == mr && nr == NR && c.cs == 1 {
                        kernel.run(kc, a, b, corner, c.rs as usize, load);
                    } else {
                        // Edges and strided C go through a tile on the stack.
                        let at = |i: usize, j: usize| corner.offset(i as isize * c.rs + j as isize * c.cs);
                        for i in 0..rows_here {
                            for j in 0..nr {
                                tile[i * NR + j] = if load { *at(i, j) } else { 0.0 };
                            }
                        }
                        kernel.run(kc, a, b, tile.as_mut_ptr(), NR, true);
                        for i in 0..rows_here {
                            for j in 0..nr {
                                *at(i, j) = tile[i * NR + j];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether this CPU has a bf16 dot-product instruction the kernels use.
pub(crate) fn native() -> bool {
    !matches!(Kernel::detect(), Kernel::Portable)
}

/// The micro-kernel this CPU runs, chosen once per product.
#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx::available() {
            return Kernel::Amx;
        }
        #[cfg(target_arch = "x86_64")]
        if avx512bf16_available() {
            return Kernel::Avx512Bf16;
        }
        Kernel::Portable
    }

    /// Rows of its C tile (and of an A panel).
    fn mr(self) -> usize {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => amx::MR,
            _ => MR,
        }
    }

    /// The k-pairs it takes at a time: packed panels are padded to a multiple.
    fn pair_step(self) -> usize {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => amx::STEP,
            _ => 1,
        }
    }

    /// k-pairs per pass over a C tile.
    fn kc(self) -> usize {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => amx::KC,
            _ => KC,
        }
    }

    /// The layouts of A's and B's panels.
    fn layouts(self) -> (Layout, Layout) {
        match self {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => (Layout::TileRowsAreLanes, Layout::TileRowsArePairs),
            _ => (Layout::PairMajor, Layout::PairMajor),
        }
    }

    /// The `mr × NR` tile at `c` (rows `ldc` apart) `(+)=` `kc` pairs of the packed panels.
    ///
    /// # Safety
    /// `c` must hold the tile; `a` and `b` at least `kc` pairs of a panel.
    unsafe fn run(self, kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, load: bool) {
        debug_assert!(a.len() >= kc * self.mr() && b.len() >= kc * NR);
        match self {
            Kernel::Portable => portable(kc, a, b, c, ldc, load),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => avx512bf16(kc, a, b, c, ldc, load),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => amx::kernel(kc, a.as_ptr(), b.as_ptr(), c, ldc, load),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512bf16_available() -> bool {
    std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512f")
}

/// The micro-kernel in plain Rust: the arithmetic of `vdpbf16ps`, lane by lane.
unsafe fn portable(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, load: bool) {
    let hi = |x: u32| f32::from_bits(x & 0xffff_0000);
    let lo = |x: u32| f32::from_bits(x << 16);
    let mut acc = [[0f32; NR]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(std::slice::from_raw_parts(c.add(i * ldc), NR));
        }
    }
    for q in 0..kc {
        let b = &b[q * NR..(q + 1) * NR];
        for (i, row) in acc.iter_mut().enumerate() {
            let x = a[q * MR + i];
            for (acc, &y) in row.iter_mut().zip(b) {
                *acc += hi(x) * hi(y);
                *acc += lo(x) * lo(y);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        std::slice::from_raw_parts_mut(c.add(i * ldc), NR).copy_from_slice(row);
    }
}

/// The micro-kernel on AVX512-BF16: 24 accumulators of 16 lanes, one `vdpbf16ps` per row and
/// half-tile per pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512bf16(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, load: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(i * ldc));
            row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
        }
    }
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for q in 0..kc {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16) as *const _));
        for (i, row) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(q * MR + i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], x, b0);
            row[1] = _mm512_dpbf16_ps(row[1], x, b1);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(i * ldc), row[0]);
        _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::{round, widen};
    use crate::rng::Rng;

    /// `C (+)= op(A)·op(B)` through [`gemm_bf16_strided`] on row-major buffers.
    fn product(c: &mut [f32], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize), ta: bool, tb: bool, acc: bool) {
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        unsafe {
            gemm_bf16_strided(
                m,
                n,
                k,
                Strided { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 },
                acc,
                Strided { ptr: a.as_ptr(), rs: a_rs, cs: a_cs },
                Strided { ptr: b.as_ptr(), rs: b_rs, cs: b_cs },
                true,
            )
        }
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    /// Against f64 sums: with the inputs rounded to bf16 first, only the k f32 additions err,
    /// by at most γ_k·Σ|a·b| (γ_k = k·2⁻²⁴/(1 − k·2⁻²⁴), sequential summation); against the f32
    /// inputs themselves, rounding each to bf16 adds (2u + u²)·Σ|a·b| with u = 2⁻⁸.
    #[test]
    fn products_are_within_the_bounds_of_bf16_inputs_and_f32_sums() {
        let mut rng = Rng::new(3);
        let shapes = [(1, 1, 1), (5, 7, 3), (12, 32, 2), (13, 33, 257), (100, 70, 300), (200, 300, 64), (3, 500, 9)];
        for &(m, n, k) in &shapes {
            for (ta, tb, acc) in [(false, false, false), (false, true, true), (true, false, false), (true, true, true)]
            {
                let (a, b, c0) = (random(m * k, &mut rng), random(k * n, &mut rng), random(m * n, &mut rng));
                let mut c = c0.clone();
                product(&mut c, &a, &b, (m, n, k), ta, tb, acc);
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let r = |x: f32| widen(round(x)) as f64;
                let gamma = k as f64 * 2f64.powi(-24) / (1.0 - k as f64 * 2f64.powi(-24));
                let u = 2f64.powi(-8);
                for i in 0..m {
                    for j in 0..n {
                        let start = if acc { c0[i * n + j] as f64 } else { 0.0 };
                        let (mut rounded, mut exact, mut magnitude) = (start, start, start.abs());
                        for l in 0..k {
                            rounded += r(at(i, l)) * r(bt(l, j));
                            exact += at(i, l) as f64 * bt(l, j) as f64;
                            magnitude += (at(i, l) as f64 * bt(l, j) as f64).abs();
                        }
                        let got = c[i * n + j] as f64;
                        let what = format!("({m},{n},{k}) ta={ta} tb={tb} acc={acc} at ({i},{j})");
                        // (1 + 2u + u²) bounds the magnitudes of the rounded products.
                        let sums = gamma * magnitude * (1.0 + 2.0 * u + u * u);
                        assert!((got - rounded).abs() <= sums, "{what}: {got} vs {rounded}");
                        assert!(
                            (got - exact).abs() <= (2.0 * u + u * u) * magnitude + sums,
                            "{what}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// A row's values do not depend on how many rows are computed with it, how the work is
    /// split, or whether it runs on several threads: decode and training forwards agree.
    #[test]
    fn each_row_is_computed_the_same_way_whatever_the_shape() {
        let mut rng = Rng::new(4);
        let (m, n, k) = (150, 300, 301);
        let (a, b) = (random(m * k, &mut rng), random(n * k, &mut rng));
        let mut all = vec![0.0; m * n];
        product(&mut all, &a, &b, (m, n, k), false, true, false);
        for row in [0, 11, 12, 97, 149] {
            let mut one = vec![0.0; n];
            product(&mut one, &a[row * k..(row + 1) * k], &b, (1, n, k), false, true, false);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&all[row * n..(row + 1) * n]), "row {row}");
        }
    }

    /// Operands whose rows and columns are both strided (views into wider matrices) pack to
    /// the same panels as their contiguous copies.
    #[test]
    fn strided_operands_give_the_contiguous_result() {
        let mut rng = Rng::new(6);
        let (m, n, k) = (29, 45, 37);
        // A is every other column of every other row of a [2m, 2k] matrix; B likewise.
        let (wide_a, wide_b) = (random(4 * m * k, &mut rng), random(4 * k * n, &mut rng));
        let a: Vec<f32> = (0..m * k).map(|x| wide_a[(x / k) * 4 * k + (x % k) * 2]).collect();
        let b: Vec<f32> = (0..k * n).map(|x| wide_b[(x / n) * 4 * n + (x % n) * 2]).collect();
        let mut want = vec![0.0; m * n];
        product(&mut want, &a, &b, (m, n, k), false, false, false);
        let mut got = vec![0.0; m * n];
        unsafe {
            gemm_bf16_strided(
                m,
                n,
                k,
                Strided { ptr: got.as_mut_ptr(), rs: n as isize, cs: 1 },
                false,
                Strided { ptr: wide_a.as_ptr(), rs: 4 * k as isize, cs: 2 },
                Strided { ptr: wide_b.as_ptr(), rs: 4 * n as isize, cs: 2 },
                true,
            )
        };
        assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()));
    }

    /// The AVX512-BF16 kernel computes what the portable one does, bit for bit (checked where
    /// the CPU has the instruction).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_vector_kernel_equals_the_portable_one() {
        if !avx512bf16_available() {
            eprintln!("this CPU has no AVX512-BF16: only the portable kernel runs here");
            return;
        }
        crate::cpu::threads::flush_denormals_to_zero();
        let mut rng = Rng::new(5);
        let kc = 77;
        // Wide exponents, so the additions' rounding and cancellation are exercised.
        let word = |rng: &mut Rng| {
            let mut half = || round(rng.normal() as f32 * 2f32.powi((rng.uniform() * 40.0) as i32 - 20)) as u32;
            half() | half() << 16
        };
        let a: Vec<u32> = (0..kc * MR).map(|_| word(&mut rng)).collect();
        let b: Vec<u32> = (0..kc * NR).map(|_| word(&mut rng)).collect();
        let c0 = random(MR * NR, &mut rng);
        let (mut portable_c, mut vector_c) = (c0.clone(), c0);
        unsafe {
            Kernel::Portable.run(kc, &a, &b, portable_c.as_mut_ptr(), NR, true);
            Kernel::Avx512Bf16.run(kc, &a, &b, vector_c.as_mut_ptr(), NR, true);
        }
        for (i, (p, v)) in portable_c.iter().zip(&vector_c).enumerate() {
            assert_eq!(p.to_bits(), v.to_bits(), "lane {i}: portable {p}, vdpbf16ps {v}");
        }
    }
}

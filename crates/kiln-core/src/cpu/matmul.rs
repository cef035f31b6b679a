//! Matrix products: f32 through the `gemm` crate (runtime-dispatched AVX2/AVX-512 kernels),
//! or kiln's own against a frozen weight packed once (`matmul_f32_packed`); bf16 inputs
//! through kiln's own kernels (`matmul_bf16`).

use super::frozen_weights::{self, Packed};
use super::matmul_bf16::{gemm_bf16_packed_b, gemm_bf16_strided};
use super::matmul_f32_packed::gemm_f32_packed_b;
use super::Shared;
use crate::backend::{GroupedMatmul, Matmul, Precision};
use gemm::Parallelism;

/// Products smaller than this many multiply-adds run on one thread: splitting them costs
/// more in synchronisation than it saves.
pub(super) const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A strided matrix operand: element `(r, c)` lives at `ptr + r*rs + c*cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<T> {
    pub ptr: T,
    pub rs: isize,
    pub cs: isize,
}

/// `C[m,n] (+)= A[m,k] · B[k,n]` on strided operands.
///
/// # Safety
/// Every pointer must be valid for the extents its strides reach, and `c` must not alias
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: Strided<*mut f32>,
    accumulate: bool,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    parallel: bool,
) {
    let par = if parallel && m * n * k >= PARALLEL_MIN_MACS { Parallelism::Rayon(0) } else { Parallelism::None };
    // gemm computes dst := alpha·dst + beta·lhs·rhs, reading dst only when asked.
    gemm::gemm(
        m, n, k, c.ptr, c.cs, c.rs, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0, 1.0, false, false, false,
        par,
    );
}

/// A strided product `(m, n, k, C, accumulate, A, B, parallel)`, as [`gemm_strided`].
type Gemm = unsafe fn(usize, usize, usize, Strided<*mut f32>, bool, Strided<*const f32>, Strided<*const f32>, bool);

/// The product for inputs in `precision`.
fn gemm_for(precision: Precision) -> Gemm {
    match precision {
        Precision::F32 => gemm_strided,
        Precision::Bf16 => gemm_bf16_strided,
    }
}

pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: Matmul) {
    let (m, n, k) = (s.m, s.n, s.k);
    assert!(a.len() >= s.batch * m * k, "matmul: A has {} elements, needs {}", a.len(), s.batch * m * k);
    assert!(b.len() >= s.batch * k * n, "matmul: B has {} elements, needs {}", b.len(), s.batch * k * n);
    assert!(c.len() >= s.batch * m * n, "matmul: C has {} elements, needs {}", c.len(), s.batch * m * n);
    let (a_rs, a_cs) = if s.trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if s.trans_b { (1, k as isize) } else { (n as isize, 1) };
    let gemm = gemm_for(s.precision);
    let run = |c: &mut [f32], a: &[f32], b: &[f32], parallel: bool| unsafe {
        gemm(
            m,
            n,
            k,
            Strided { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 },
            s.accumulate,
            Strided { ptr: a.as_ptr(), rs: a_rs, cs: a_cs },
            Strided { ptr: b.as_ptr(), rs: b_rs, cs: b_cs },
            parallel,
        )
    };
    if s.batch == 1 {
        let weight = Strided { ptr: b.as_ptr(), rs: b_rs, cs: b_cs };
        // SAFETY: B holds k·n elements (checked above) at the strides of its layout.
        let packed = if s.b_is_weight { unsafe { frozen_weights::packed(s.precision, n, k, weight) } } else { None };
        let (c_tile, a_op) =
            (Strided { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 }, Strided { ptr: a.as_ptr(), rs: a_rs, cs: a_cs });
        match packed.as_deref() {
            Some(Packed::Bf16(pb)) => unsafe { gemm_bf16_packed_b(m, c_tile, s.accumulate, a_op, pb, true) },
            Some(Packed::F32(pb)) => unsafe { gemm_f32_packed_b(m, c_tile, s.accumulate, a_op, pb, true) },
            None => run(c, a, b, true),
        }
        return;
    }
    use rayon::prelude::*;
    c[..s.batch * m * n]
        .par_chunks_mut(m * n)
        .zip(a.par_chunks(m * k))
        .zip(b.par_chunks(k * n))
        .for_each(|((c, a), b)| run(c, a, b, false));
}

/// Group offsets (in rows) and the total, checking the buffers against them.
fn group_offsets(rows: &[usize]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(rows.len());
    let mut total = 0;
    for &r in rows {
        offsets.push(total);
        total += r;
    }
    (offsets, total)
}

/// Runs `f(group, first_row)` for every non-empty group: groups in parallel, each product on
/// one thread, when there are enough of them to keep every core busy; else one group at a
/// time with a parallel product.
fn for_each_group(rows: &[usize], f: impl Fn(usize, usize, bool) + Sync) {
    use rayon::prelude::*;
    let (offsets, _) = group_offsets(rows);
    let busy = rows.iter().filter(|&&r| r > 0).count();
    if busy >= 2 * rayon::current_num_threads() {
        (0..rows.len()).into_par_iter().filter(|&g| rows[g] > 0).for_each(|g| f(g, offsets[g], false));
    } else {
        (0..rows.len()).filter(|&g| rows[g] > 0).for_each(|g| f(g, offsets[g], true));
    }
}

pub fn grouped(c: &mut [f32], a: &[f32], b: &[f32], rows: &[usize], s: GroupedMatmul) {
    let (n, k) = (s.n, s.k);
    let (_, total) = group_offsets(rows);
    assert!(a.len() == total * k && c.len() == total * n, "grouped_matmul: A or C does not hold {total} rows");
    assert_eq!(b.len(), rows.len() * n * k, "grouped_matmul: B must hold one [n, k] matrix per group");
    let (b_rs, b_cs) = if s.trans_b { (1, k as isize) } else { (n as isize, 1) };
    let (cp, gemm) = (Shared(c.as_mut_ptr()), gemm_for(s.precision));
    for_each_group(rows, |g, first, parallel| unsafe {
        gemm(
            rows[g],
            n,
            k,
            Strided { ptr: cp.ptr().add(first * n), rs: n as isize, cs: 1 },
            s.accumulate,
            Strided { ptr: a.as_ptr().add(first * k), rs: k as isize, cs: 1 },
            Strided { ptr: b.as_ptr().add(g * n * k), rs: b_rs, cs: b_cs },
            parallel,
        )
    });
}

pub fn grouped_weight_grad(db: &mut [f32], dc: &[f32], a: &[f32], rows: &[usize], s: GroupedMatmul) {
    let (n, k) = (s.n, s.k);
    let (_, total) = group_offsets(rows);
    assert!(
        a.len() == total * k && dc.len() == total * n,
        "grouped_matmul_weight_grad: A or dC does not hold {total} rows"
    );
    assert_eq!(db.len(), rows.len() * n * k, "grouped_matmul_weight_grad: dB must hold one matrix per group");
    let (dbp, gemm) = (Shared(db.as_mut_ptr()), gemm_for(s.precision));
    // dC_gᵀ[n, m] · A_g[m, k] is dB_g in the `[n, k]` layout; written with swapped
    // strides it lands transposed, in the `[k, n]` layout.
    let (dst_rs, dst_cs) = if s.trans_b { (k as isize, 1) } else { (1, n as isize) };
    for_each_group(rows, |g, first, parallel| unsafe {
        gemm(
            n,
            k,
            rows[g],
            Strided { ptr: dbp.ptr().add(g * n * k), rs: dst_rs, cs: dst_cs },
            true,
            Strided { ptr: dc.as_ptr().add(first * n), rs: 1, cs: n as isize },
            Strided { ptr: a.as_ptr().add(first * k), rs: k as isize, cs: 1 },
            parallel,
        )
    });
}

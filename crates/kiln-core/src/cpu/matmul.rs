//! Matrix products through the `gemm` crate (runtime-dispatched AVX2/AVX-512 kernels).

use crate::backend::Matmul;
use gemm::Parallelism;

/// Products smaller than this many multiply-adds run on one thread: splitting them costs
/// more in synchronisation than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

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

pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: Matmul) {
    let (m, n, k) = (s.m, s.n, s.k);
    assert!(a.len() >= s.batch * m * k, "matmul: A has {} elements, needs {}", a.len(), s.batch * m * k);
    assert!(b.len() >= s.batch * k * n, "matmul: B has {} elements, needs {}", b.len(), s.batch * k * n);
    assert!(c.len() >= s.batch * m * n, "matmul: C has {} elements, needs {}", c.len(), s.batch * m * n);
    let (a_rs, a_cs) = if s.trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if s.trans_b { (1, k as isize) } else { (n as isize, 1) };
    let run = |c: &mut [f32], a: &[f32], b: &[f32], parallel: bool| unsafe {
        gemm_strided(
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
        run(c, a, b, true);
        return;
    }
    use rayon::prelude::*;
    c[..s.batch * m * n]
        .par_chunks_mut(m * n)
        .zip(a.par_chunks(m * k))
        .zip(b.par_chunks(k * n))
        .for_each(|((c, a), b)| run(c, a, b, false));
}

//! Matrix products on cuBLAS, in kiln's row-major convention.
//!
//! A row-major `C[m, n] = op(A)·op(B)` is the column-major `Cᵀ[n, m] = op(B)ᵀ·op(A)ᵀ`, so
//! cuBLAS is handed B's storage first and A's second with their transposes as stored. f32
//! products compute in `CUBLAS_COMPUTE_32F` (never TF32), bf16 inputs with f32 sums and an f32
//! result (`cublasGemmStridedBatchedEx`), as PyTorch's autocast products.

use crate::device::{args, Cuda};
use crate::frozen_weights;
use crate::memory::Allocation;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasGemmStridedBatchedEx, cublasOperation_t, cublasStatus_t,
    cudaDataType_t,
};
use kiln_core::{Matmul, Precision};
use std::rc::Rc;
use std::sync::Arc;

impl Cuda {
    /// `spec`'s product on the device addresses `a`, `b` and `c`.
    pub(crate) fn gemm(&self, spec: Matmul, a: u64, b: u64, c: u64) {
        let Matmul { m, n, k, trans_a, trans_b, batch, accumulate, precision, b_is_weight } = spec;
        if m == 0 || n == 0 || batch == 0 {
            return;
        }
        // Inputs rounded to bf16 live in scratch memory for the product (stream-ordered frees),
        // a weight's for as long as weights are frozen.
        let (a_len, b_len) = (batch * m * k, batch * k * n);
        let round_b = || self.round_bf16(b, b_len);
        let rounded = (precision == Precision::Bf16).then(|| {
            let rb = if b_is_weight {
                frozen_weights::rounded((Arc::as_ptr(self.stream()) as usize, b, b_len), round_b)
            } else {
                Rc::new(round_b())
            };
            (self.round_bf16(a, a_len), rb)
        });
        let (a, b, data) = match &rounded {
            Some((ra, rb)) => (ra.ptr(), rb.ptr(), cudaDataType_t::CUDA_R_16BF),
            None => (a, b, cudaDataType_t::CUDA_R_32F),
        };
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (ld_a, ld_b) = (if trans_a { m } else { k }, if trans_b { k } else { n });
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        let int = |x: usize| i32::try_from(x).unwrap_or_else(|_| panic!("cuBLAS: dimension {x} beyond i32"));
        self.bind();
        // SAFETY: the addresses hold the batch·(m·k, k·n, m·n) values the shapes say (asserted
        // by the callers), the scratch lives until after the call is queued.
        let status = unsafe {
            cublasGemmStridedBatchedEx(
                *self.inner.blas.handle(),
                op(trans_b),
                op(trans_a),
                int(n),
                int(m),
                int(k),
                (&alpha as *const f32).cast(),
                b as usize as *const _,
                data,
                int(ld_b),
                (k * n) as i64,
                a as usize as *const _,
                data,
                int(ld_a),
                (m * k) as i64,
                (&beta as *const f32).cast(),
                c as usize as *mut _,
                cudaDataType_t::CUDA_R_32F,
                int(n),
                (m * n) as i64,
                int(batch),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        assert!(
            status == cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            "cuBLAS: product m {m} n {n} k {k} batch {batch} ({precision:?}) failed: {status:?}"
        );
    }

    /// `len` values at `src` rounded to bf16, in new scratch memory.
    fn round_bf16(&self, src: u64, len: usize) -> Allocation {
        let dst = Allocation::new(self.stream(), 2 * len);
        self.launch_elements(
            "round_bf16",
            len,
            &args![crate::device::Arg::Ptr(dst.ptr()), crate::device::Arg::Ptr(src), len],
        );
        dst
    }
}

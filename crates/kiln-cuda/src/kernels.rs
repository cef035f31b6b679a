//! kiln's CUDA C kernels: embedded in the binary and compiled once per process by NVRTC for
//! the device's architecture, so building kiln needs no CUDA toolkit.

use crate::library::Library;
use anyhow::{anyhow, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};

/// The kernel files, in the order NVRTC sees them (the shared helpers first).
const FILES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("embedding.cu", include_str!("kernels/embedding.cu")),
    ("rmsnorm.cu", include_str!("kernels/rmsnorm.cu")),
    ("rope.cu", include_str!("kernels/rope.cu")),
    ("attention_lanes.cuh", include_str!("kernels/attention_lanes.cuh")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("attention_decode.cu", include_str!("kernels/attention_decode.cu")),
    ("attention_sinks.cu", include_str!("kernels/attention_sinks.cu")),
    ("mma.cuh", include_str!("kernels/mma.cuh")),
    ("attention_mma.cu", include_str!("kernels/attention_mma.cu")),
    ("loss.cu", include_str!("kernels/loss.cu")),
    ("moe_route.cu", include_str!("kernels/moe_route.cu")),
    ("hyper_connection.cu", include_str!("kernels/hyper_connection.cu")),
];

/// Every kernel the backend launches.
pub const NAMES: &[&str] = &[
    "fill",
    "add_assign",
    "scale",
    "sum_squares_partial",
    "copy_columns",
    "add_bias",
    "bias_backward",
    "scale_rows",
    "row_dot",
    "swiglu_forward",
    "swiglu_backward",
    "round_bf16",
    "round_to_bf16",
    "muon_momentum",
    "adamw",
    "embedding_forward",
    "embedding_backward",
    "scatter_rows_f32",
    "scatter_rows_bf16",
    "rmsnorm_forward",
    "add_rmsnorm_forward",
    "rmsnorm_backward_dx",
    "rmsnorm_backward_dw",
    "rope",
    "attention_forward",
    "attention_backward_dq",
    "attention_backward_dkdv",
    "attention_forward_bf16",
    "attention_backward_dq_bf16",
    "attention_backward_dkdv_bf16",
    "attention_decode_f32",
    "attention_decode_bf16",
    "attention_sinks_forward",
    "attention_merge",
    "attention_sinks_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "reverse_kl_backward",
    "vocab_block_stats",
    "cross_entropy_block_backward",
    "reverse_kl_block_forward",
    "reverse_kl_block_backward",
    "moe_route_forward",
    "hc_weights_forward",
    "hc_weights_backward_z",
    "hc_weights_backward_sums",
    "hc_weights_backward_scale",
    "hc_weights_backward_mixes",
    "moe_route_backward",
];

/// All files as one program; `#line` directives make compiler messages name the file.
pub fn source() -> String {
    FILES.iter().map(|(name, text)| format!("#line 1 \"{name}\"\n{text}\n")).collect()
}

/// The kernels compiled to machine code (CUBIN) for `arch` (e.g. `sm_90`).
///
/// Machine code, not PTX: pip's NVRTC can be newer than the driver (NVRTC 13.x against driver
/// 580's CUDA 13.0), and a newer compiler's PTX may use an ISA the driver cannot JIT, while
/// machine code for the device's own architecture loads under CUDA's minor-version
/// compatibility.
pub fn compile(arch: &str) -> Result<Vec<u8>> {
    Library::Nvrtc.require()?;
    let source = CString::new(source()).expect("kernel sources hold no NUL");
    let program = result::create_program(&source, None).map_err(|e| anyhow!("NVRTC: creating the program: {e:?}"))?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    // SAFETY: `program` is live until destroyed below; out-buffers are sized by NVRTC's answers.
    let cubin = unsafe {
        let compiled = result::compile_program(program, &options);
        let cubin = match compiled {
            Ok(()) => cubin_of(program),
            Err(e) => {
                let log = result::get_program_log(program).unwrap_or_default();
                let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
                Err(anyhow!("NVRTC could not compile kiln's kernels for {arch} ({e:?}):\n{log}"))
            }
        };
        let _ = result::destroy_program(program);
        cubin
    };
    cubin
}

/// The compiled program's CUBIN.
///
/// # Safety
/// `program` was compiled successfully and is not destroyed.
unsafe fn cubin_of(program: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| anyhow!("NVRTC: CUBIN size: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast()).result().map_err(|e| anyhow!("NVRTC: CUBIN: {e:?}"))?;
    Ok(cubin)
}

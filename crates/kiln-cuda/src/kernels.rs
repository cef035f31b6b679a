//! kiln's CUDA C kernels: embedded in the binary and compiled once per process by NVRTC for
//! the device's architecture, so building kiln needs no CUDA toolkit.

use crate::library::Library;
use anyhow::{anyhow, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// The kernel files, in the order NVRTC sees them (the shared helpers first).
const FILES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("embedding.cu", include_str!("kernels/embedding.cu")),
    ("rmsnorm.cu", include_str!("kernels/rmsnorm.cu")),
    ("rope.cu", include_str!("kernels/rope.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("loss.cu", include_str!("kernels/loss.cu")),
    ("moe_route.cu", include_str!("kernels/moe_route.cu")),
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
    "attention_decode_f32",
    "attention_decode_bf16",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "reverse_kl_backward",
    "moe_route_forward",
    "moe_route_backward",
];

/// All files as one program; `#line` directives make compiler messages name the file.
pub fn source() -> String {
    FILES.iter().map(|(name, text)| format!("#line 1 \"{name}\"\n{text}\n")).collect()
}

/// The kernels compiled to PTX for `arch` (e.g. `sm_90`).
pub fn compile(arch: &str) -> Result<Ptx> {
    Library::Nvrtc.require()?;
    let options = CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source(), options).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            anyhow!("NVRTC could not compile kiln's kernels for {arch}:\n{}", log.to_string_lossy())
        }
        other => anyhow!("NVRTC failed for {arch}: {other:?}"),
    })
}

//! kiln's CUDA backend: `Backend` on an Nvidia GPU.
//!
//! cudarc loads the CUDA libraries at run time (`dynamic-loading`), so kiln builds and its
//! tests run on machines without CUDA, and one binary uses a GPU where it finds one. Matrix
//! products run on cuBLAS (f32 in full f32, bf16 inputs with f32 sums); every other operation
//! is a CUDA C kernel from `src/kernels/`, compiled once per process by NVRTC for the device.
//! Missing libraries or devices are errors that say what was searched ([`Library`]).

mod attention_tiling;
mod backend;
mod blas;
mod compressed_on_host;
mod device;
mod frozen_weights;
pub mod kernels;
mod library;
mod memory;
mod memory_pool;
mod nccl;
mod one_device;

pub use device::{test_device, Cuda};
pub use library::Library;
pub use memory::{DeviceBuf, DeviceIndex, DeviceSlice, Word};
pub use nccl::{nccl_present, nccl_version, test_nccl, NcclComm};
pub use one_device::OneDevice;

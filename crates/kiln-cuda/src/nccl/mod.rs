//! Collectives between GPUs: NCCL, opened at run time ([`library`]), behind `Comm` on device
//! buffers ([`NcclComm`]).

mod comm;
mod library;

pub use comm::NcclComm;
pub use library::{nccl_present, nccl_version, test_nccl};

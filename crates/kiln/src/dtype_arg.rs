//! `--dtype`: the precision of the matrix products of commands that compute outside a run
//! configuration (`train.dtype` inside one).

use kiln_core::{Backend, Precision};
use kiln_train::config::ComputeDtype;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    /// Mixed precision: bf16 inputs, f32 sums.
    Bf16,
    /// bf16 where the device computes it natively, else f32.
    Auto,
}

impl DtypeArg {
    pub fn dtype(self) -> ComputeDtype {
        match self {
            DtypeArg::F32 => ComputeDtype::F32,
            DtypeArg::Bf16 => ComputeDtype::Bf16,
            DtypeArg::Auto => ComputeDtype::Auto,
        }
    }

    pub fn precision<B: Backend>(self, b: &B) -> Precision {
        self.dtype().precision(b)
    }

    /// The spelling of `train.dtype` in a run configuration.
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::Auto => "auto",
        }
    }
}

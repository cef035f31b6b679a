//! `kiln plan`: will a post-training job fit a cluster, with which layout, and how fast?
//!
//! The model's shape comes from its Hugging Face `config.json` (`model`), the devices from a
//! catalogue (`device`); a `Job` (method, sequence length, batch, optimizer) and a `Layout`
//! (data, tensor, pipeline and expert parallel sizes, ZeRO stage, recomputation) give the
//! memory per device (`memory`) and the step time (`time`); `search` ranks the layouts that
//! fit. Every number is an estimate from stated assumptions, each explained by `--explain`.

pub mod device;
pub mod job;
pub mod memory;
pub mod model;
pub mod search;
pub mod stages;
pub mod time;

pub use device::{Cluster, Device};
pub use job::{Job, Layout, Method, Optimizer, Recompute, Storage};
pub use model::ModelShape;
pub use search::{evaluate, search, Estimate};
pub use stages::StageCut;

/// Bytes in a GB (10^9, as device makers count HBM).
pub const GB: f64 = 1e9;

//! The training half of kiln, generic over the backend: one session and step protocol
//! (`session`, `trainer`), the update of every layout (`data_parallel`), checkpoints, the
//! components recipes share (`data`, `preference`, `rollout`, `rewards`), and the recipes,
//! each little more than its loss (`sft`, `dpo`, `rm`, `kto`, `grpo`, `distill`).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod data_parallel;
pub mod distill;
pub mod dpo;
mod grad_buckets;
pub mod grpo;
pub mod grpo_loss;
pub mod kto;
pub mod layout;
pub mod loader;
pub mod metrics;
pub mod muon;
pub mod optim;
pub mod preference;
pub mod preference_loss;
pub mod resident;
pub mod rewards;
pub mod rm;
pub mod rollout;
pub mod schedule;
pub mod session;
pub mod sft;
mod started_reductions;
pub mod tensorboard;
pub mod trainer;

pub use config::RunConfig;
pub use session::{Resume, RunSummary, Runtime};

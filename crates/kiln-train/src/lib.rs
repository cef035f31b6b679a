//! Optimisers, schedules, checkpoints and the training recipes.

pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod dpo;
pub mod grads;
pub mod grpo;
pub mod grpo_loss;
pub mod loader;
pub mod metrics;
pub mod optim;
pub mod preference_loss;
pub mod rewards;
pub mod rm;
pub mod schedule;
pub mod session;
pub mod sft;
pub mod zero;

pub use config::RunConfig;
pub use optim::{zero_grads, AdamW};

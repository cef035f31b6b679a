//! Optimisers and training loops.

pub mod optim;

pub use optim::{zero_grads, AdamW};

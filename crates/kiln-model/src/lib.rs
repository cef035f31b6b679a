//! Hugging Face model directories in and out, and the architectures kiln trains.

pub mod activations;
pub mod batch;
pub mod config;
pub mod error;
pub mod generate;
pub mod llama;
pub mod moe;
pub mod rope;
pub mod weights;

pub use activations::Activations;
pub use batch::Batch;
pub use config::{Config, ModelType};
pub use error::{Error, Result};
pub use llama::Model;
pub use weights::{StorageDtype, TensorSpec, Weights};

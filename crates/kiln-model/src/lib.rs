//! Hugging Face model directories in and out, and the architectures kiln trains.

pub mod activations;
pub mod batch;
pub mod config;
pub mod error;
pub mod generate;
pub mod generator;
pub mod grad_sink;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod rope;
pub mod safetensors_io;
pub mod sampler;
pub mod weights;

pub use activations::{Activations, ActivationsPool};
pub use batch::Batch;
pub use config::{Config, ModelType};
pub use error::{Error, Result};
pub use grad_sink::GradSink;
pub use layers::expert_parallel::ExpertParallel;
pub use model::Model;
pub use safetensors_io::StorageDtype;
pub use weights::{TensorSpec, Weights};

//! Hugging Face model directories in and out, and the architectures kiln trains.

pub mod activations;
pub mod batch;
pub mod completion_rows;
pub mod compress_plan;
pub mod config;
pub mod config_v4;
pub mod error;
pub mod flat;
pub mod generate;
pub mod generator;
pub mod golden;
pub mod grad_sink;
pub mod kv_cache;
pub mod layers;
pub mod model;
mod model_v4;
pub mod param_shards;
mod prompt_pool;
pub mod quantized;
pub mod rope;
pub mod safetensors_io;
pub mod sampler;
pub mod score_head;
pub mod v4_cache;
pub mod weights;

pub use activations::{Activations, ActivationsPool};
pub use batch::Batch;
pub use completion_rows::CompletionRows;
pub use config::{Config, ModelType};
pub use error::{Error, Result};
pub use flat::FlatLayout;
pub use grad_sink::{FlatGrads, GradSink};
pub use layers::expert_parallel::ExpertParallel;
pub use model::Model;
pub use safetensors_io::StorageDtype;
pub use weights::{TensorSpec, Weights};

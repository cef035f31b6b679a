//! kiln's compute engine.
//!
//! [`Backend`] is the narrow set of operations that model code is written against; [`Cpu`]
//! implements it on the host. [`conformance`] checks any backend against plain reference
//! loops and finite differences, so a new accelerator proves itself with the same suite.

pub mod backend;
pub mod bf16;
pub mod conformance;
pub mod cpu;
pub mod fast_exp;
pub mod reduce;
pub mod rng;

pub use backend::{group_segment, segment_sees, shared_prefix, PREFIX_MEMBER};
pub use backend::{
    AdamW, Attention, Backend, ColumnCopy, DecodeAttention, FrozenWeights, GroupedMatmul, Heads, HyperConnection,
    Indexer, Matmul, Pooling, Precision, Rope, Routing, Scoring, SparseAttention,
};
pub use cpu::Cpu;

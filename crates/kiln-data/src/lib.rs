//! From dataset rows to packed training batches: tokenizer, chat template, loss masks, packing.

pub mod chat_template;
mod completion;
pub mod example;
pub mod packing;
pub mod preference;
pub mod prompts;
pub mod rows;
pub mod tokenizer;
mod trl_template;
pub mod unpaired;

pub use chat_template::{AssistantMask, ChatTemplate};
pub use example::{Example, Tokenized};
pub use rows::{Message, Row, RowKind};
pub use tokenizer::Tokenizer;

/// An error naming the file, line and field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct Error {
    pub location: String,
    pub message: String,
}

impl Error {
    pub fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self { location: location.into(), message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

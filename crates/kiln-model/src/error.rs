use std::path::{Path, PathBuf};

/// An error tied to the file it came from; the message names the field or tensor at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct Error {
    pub path: PathBuf,
    pub message: String,
}

impl Error {
    pub fn new(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self { path: path.as_ref().to_path_buf(), message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

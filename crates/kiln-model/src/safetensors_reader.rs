//! A safetensors file read a tensor at a time: its header first, then the bytes of each tensor
//! asked for with a positioned read. Nothing of the file is mapped, so a rank that loads its
//! pipeline stage or tensor blocks of a model holds (and addresses) only what it reads, under
//! a memory limit smaller than the checkpoint (`ulimit -v`).

use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An open safetensors file and its header.
pub struct StoredFile {
    pub path: PathBuf,
    file: File,
    /// Where the tensors' data starts: past the 8-byte header length and the header.
    data_start: u64,
    header: Metadata,
}

impl StoredFile {
    /// Opens `path` and reads its header, checking that the data it lays out fills the file.
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |why: String| Error::new(path, format!("invalid safetensors: {why}"));
        let file = File::open(path).map_err(|e| Error::new(path, format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| Error::new(path, format!("cannot stat: {e}")))?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(|e| invalid(format!("no header length ({e})")))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > file_len.saturating_sub(8) {
            return Err(invalid(format!("a header of {header_len} bytes in a file of {file_len}")));
        }
        let mut text = vec![0u8; header_len as usize];
        file.read_exact_at(&mut text, 8).map_err(|e| invalid(format!("cannot read the header ({e})")))?;
        let header: Metadata = serde_json::from_slice(&text).map_err(|e| invalid(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        if data_start + header.data_len() as u64 != file_len {
            let (data, rest) = (header.data_len(), file_len - data_start);
            return Err(invalid(format!("the header lays out {data} bytes of data, the file holds {rest}")));
        }
        Ok(Self { path: path.to_path_buf(), file, data_start, header })
    }

    /// Every tensor's name and header entry (dtype, shape, place), in the order of their data.
    pub fn tensors(&self) -> Vec<(String, &TensorInfo)> {
        let mut tensors: Vec<(String, &TensorInfo)> = self.header.tensors().into_iter().collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets.0);
        tensors
    }

    /// The bytes of the tensor `info` (an entry of `tensors`) names.
    pub fn read(&self, name: &str, info: &TensorInfo) -> Result<Vec<u8>> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .read_exact_at(&mut bytes, self.data_start + start as u64)
            .map_err(|e| Error::new(&self.path, format!("cannot read tensor `{name}`: {e}")))?;
        Ok(bytes)
    }
}

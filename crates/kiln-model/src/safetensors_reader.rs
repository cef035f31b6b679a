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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    #[test]
    fn reads_each_tensor_the_safetensors_crate_wrote_and_refuses_a_cut_file() {
        let dir = std::env::temp_dir().join(format!("kiln-stored-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = (100..106u8).collect();
        let tensors = [("a.weight", Dtype::F32, vec![2, 3], &a), ("b.weight", Dtype::BF16, vec![3], &b)];
        let views = tensors.iter().map(|(n, d, s, bytes)| {
            (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), bytes).unwrap())
        });
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();

        let file = StoredFile::open(&path).unwrap();
        let read = file.tensors();
        assert_eq!(read.len(), 2);
        for (name, dtype, shape, bytes) in tensors {
            let (_, info) = read.iter().find(|(n, _)| n == name).expect("every tensor listed");
            assert_eq!((info.dtype, &info.shape), (dtype, &shape), "{name}");
            assert_eq!(&file.read(name, info).unwrap(), bytes, "{name}");
        }

        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        let err = StoredFile::open(&path).err().expect("a file cut short is refused").to_string();
        assert!(err.contains("model.safetensors") && err.contains("the file holds 29"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

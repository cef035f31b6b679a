//! A safetensors file written a tensor at a time: the header goes first, laid out from the
//! tensors' names, dtypes and shapes alone, and each tensor's bytes go to their place when they
//! come, in any order. A writer so holds one tensor, not the file: what lets a rank write a
//! checkpoint whose tensors it assembles one by one (`Model::visit_whole`).
//!
//! The layout is the safetensors crate's own (`serialize_to_file`): tensors by descending dtype
//! alignment then by name, the JSON header padded with spaces to 8 bytes. The bytes are the
//! ones that function writes for the same tensors.

use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A tensor of a file to write: its name, dtype and shape.
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// A safetensors file being written (see the module).
pub struct StreamedFile {
    file: File,
    path: PathBuf,
    /// Where each tensor's bytes go (from the start of the file), how many, and whether they came.
    places: HashMap<String, (u64, usize, bool)>,
}

impl StreamedFile {
    /// Creates `path` with the header of `entries` (and `metadata`), the data still to come.
    pub fn create(path: &Path, mut entries: Vec<Entry>, metadata: Option<HashMap<String, String>>) -> Result<Self> {
        entries.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
        let mut offset = 0;
        let mut infos = Vec::with_capacity(entries.len());
        for e in entries {
            let bytes = e.shape.iter().product::<usize>() * e.dtype.bitsize() / 8;
            infos.push((e.name, TensorInfo { dtype: e.dtype, shape: e.shape, data_offsets: (offset, offset + bytes) }));
            offset += bytes;
        }
        let invalid = |e: &dyn std::fmt::Display| Error::new(path, format!("cannot lay out the tensors: {e}"));
        let places_in_data: Vec<(String, usize, usize)> =
            infos.iter().map(|(name, info)| (name.clone(), info.data_offsets.0, info.data_offsets.1)).collect();
        let metadata = Metadata::new(metadata, infos).map_err(|e| invalid(&e))?;
        let mut header = serde_json::to_string(&metadata).map_err(|e| invalid(&e))?.into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;
        let file = File::create(path).map_err(|e| Error::new(path, format!("cannot create: {e}")))?;
        let write = |bytes: &[u8], at: u64| file.write_all_at(bytes, at);
        write(&(header.len() as u64).to_le_bytes(), 0)
            .and_then(|_| write(&header, 8))
            .and_then(|_| file.set_len(data_start + offset as u64))
            .map_err(|e| Error::new(path, format!("cannot write: {e}")))?;
        let places = places_in_data
            .into_iter()
            .map(|(name, start, end)| (name, (data_start + start as u64, end - start, false)))
            .collect();
        Ok(Self { file, path: path.to_path_buf(), places })
    }

    /// Writes the bytes of tensor `name`.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = &self.path;
        let Some((at, len, done)) = self.places.get_mut(name) else {
            return Err(Error::new(path, format!("tensor `{name}` is not in the file's header")));
        };
        if bytes.len() != *len || *done {
            return Err(Error::new(path, format!("tensor `{name}`: {} bytes for {len}, or twice", bytes.len())));
        }
        self.file.write_all_at(bytes, *at).map_err(|e| Error::new(path, format!("cannot write `{name}`: {e}")))?;
        *done = true;
        Ok(())
    }

    /// Closes the file; an error names a tensor whose bytes never came.
    pub fn finish(self) -> Result<()> {
        match self.places.iter().find(|(_, (_, _, done))| !done) {
            Some((name, _)) => Err(Error::new(&self.path, format!("tensor `{name}` was never written"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_bytes_the_safetensors_crate_writes_in_any_order() {
        let dir = std::env::temp_dir().join(format!("kiln-streamed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = (0..6u8).collect();
        let c: Vec<u8> = (0..3u8).collect();
        let tensors = [
            ("b.weight", Dtype::BF16, vec![3], &b),
            ("a.weight", Dtype::F32, vec![2, 3], &a),
            ("c", Dtype::U8, vec![3], &c),
        ];
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let views = tensors.iter().map(|(n, d, s, bytes)| {
            (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), bytes).unwrap())
        });
        let reference = dir.join("reference.safetensors");
        safetensors::serialize_to_file(views, Some(metadata.clone()), &reference).unwrap();

        let streamed = dir.join("streamed.safetensors");
        let entries = tensors.iter().map(|(n, d, s, _)| Entry { name: n.to_string(), dtype: *d, shape: s.clone() });
        let mut file = StreamedFile::create(&streamed, entries.collect(), Some(metadata)).unwrap();
        for (name, _, _, bytes) in tensors.iter().rev() {
            file.write(name, bytes).unwrap();
        }
        assert!(file.write("a.weight", &a).is_err(), "a tensor written twice");
        file.finish().unwrap();
        assert_eq!(std::fs::read(&streamed).unwrap(), std::fs::read(&reference).unwrap());

        let mut unfinished = StreamedFile::create(
            &dir.join("unfinished.safetensors"),
            vec![Entry { name: "x".into(), dtype: Dtype::F32, shape: vec![1] }],
            None,
        )
        .unwrap();
        assert!(unfinished.write("y", &[0; 4]).is_err(), "a tensor not in the header");
        assert!(unfinished.finish().unwrap_err().to_string().contains("`x` was never written"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

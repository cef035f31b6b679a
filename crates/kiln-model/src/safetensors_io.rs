//! Loading and saving a model's tensors as safetensors: a single file or shards listed by an
//! index, memory-mapped, converted to f32 once; per-expert tensors stacked on load and split
//! on save; fp8 and fp4 block-quantized weights dequantized (`quantized`); tensors kiln does not train (DeepSeek's
//! multi-token-prediction layers) carried through byte for byte.

use crate::error::{Error, Result};
use crate::quantized;
use crate::safetensors_reader::StoredFile;
use crate::safetensors_writer::{Entry, StreamedFile};
use crate::weights::{TensorSpec, Weights};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Storage dtypes kiln writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    BF16,
    F16,
}

impl StorageDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
    fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::BF16 => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Self::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        }
    }
}

/// The values of a stored tensor as f32 (quantized ones still to be scaled); `None` for a
/// dtype kiln does not read.
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F8_E4M3 => bytes.iter().map(|&b| quantized::f8_e4m3_to_f32(b)).collect(),
        Dtype::I8 => quantized::unpack_fp4(bytes),
        _ => return None,
    })
}

/// A tensor kept exactly as it was read.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// What to read from a checkpoint.
pub struct LoadSpec<'a> {
    pub layout: &'a Weights<TensorSpec>,
    /// Tensors outside the layout to carry through unchanged.
    pub passthrough: &'a dyn Fn(&str) -> bool,
    /// Block of one scale in fp8 checkpoints (`quantization_config.weight_block_size`).
    pub fp8_block: [usize; 2],
    /// Which of the layout's tensors to read, and what of each to keep: every one whole unless
    /// a rank holds a part of the model (`model_share`).
    pub pick: Pick<'a>,
}

impl<'a> LoadSpec<'a> {
    /// Just the layout's tensors.
    pub fn plain(layout: &'a Weights<TensorSpec>) -> Self {
        Self { layout, passthrough: &|_| false, fp8_block: [128, 128], pick: Pick::ALL }
    }
}

/// The layout's tensors a load reads (`reads`, by index in `Weights::iter` order; the others
/// come back empty and are not read from the file at all), and what it keeps of each as it
/// comes (`keep`: of tensor `i`'s values, or of stacked part `p`'s), so that no more than one
/// whole tensor is held beyond what is kept.
#[derive(Clone, Copy)]
pub struct Pick<'a> {
    pub reads: &'a dyn Fn(usize) -> bool,
    pub keep: &'a dyn Fn(usize, Option<usize>, Vec<f32>) -> Vec<f32>,
}

impl Pick<'_> {
    /// Every tensor, whole.
    pub const ALL: Pick<'static> = Pick { reads: &|_| true, keep: &|_, _, values| values };
}

/// Tensors read from a checkpoint.
pub struct LoadedWeights {
    pub tensors: Weights<Vec<f32>>,
    /// The dtype the checkpoint stored its embedding in, used again when saving.
    pub dtype: StorageDtype,
    pub passthrough: Vec<RawTensor>,
    /// How many fp8 tensors were dequantized.
    pub dequantized: usize,
}

/// Loads `dir/model.safetensors` or the shards listed by `dir/model.safetensors.index.json`.
pub fn load(dir: &Path, spec: &LoadSpec) -> Result<LoadedWeights> {
    load_files(dir, shards(dir)?.into_iter(), spec)
}

/// The names of every tensor stored in the model directory `dir` (headers only).
pub fn stored_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for path in shards(dir)? {
        names.extend(StoredFile::open(&path)?.tensors().into_iter().map(|(name, _)| name));
    }
    Ok(names)
}

/// The safetensors files of the model directory `dir`: `model.safetensors`, or the shards
/// `model.safetensors.index.json` lists.
fn shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut files: BTreeMap<String, ()> = BTreeMap::new();
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::new(&index, format!("cannot read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::new(&index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::new(&index, "field `weight_map` is missing or not an object"))?;
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::new(&index, format!("field `weight_map.{name}`: expected a file name")))?;
            files.insert(file.to_string(), ());
        }
    } else if single.exists() {
        files.insert("model.safetensors".into(), ());
    } else {
        return Err(Error::new(dir, "no model.safetensors or model.safetensors.index.json in the model directory"));
    }
    Ok(files.into_keys().map(|f| dir.join(f)).collect())
}

/// Loads the layout's tensors from one safetensors file.
pub fn load_file(path: &Path, layout: &Weights<TensorSpec>) -> Result<LoadedWeights> {
    load_files(path, std::iter::once(path.to_path_buf()), &LoadSpec::plain(layout))
}

/// Loads the layout's tensors `pick` reads from the union of `files` (shards of one set);
/// `source` names the set in errors.
pub fn load_file_set(
    source: &Path,
    files: &[PathBuf],
    layout: &Weights<TensorSpec>,
    pick: Pick,
) -> Result<LoadedWeights> {
    load_files(source, files.iter().cloned(), &LoadSpec { pick, ..LoadSpec::plain(layout) })
}

/// A stored tensor as read: dtype, shape, values, the file it came from, and which of the
/// layout's tensors (and of its stacked parts) it is.
struct Found {
    /// As stored; F32 once a quantized tensor is dequantized.
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<f32>,
    file: PathBuf,
    of: (usize, Option<usize>),
}

/// Loads the tensors of `spec.layout` that `spec.pick` reads from the union of `files`;
/// `source` names them in errors.
fn load_files(source: &Path, files: impl Iterator<Item = PathBuf>, spec: &LoadSpec) -> Result<LoadedWeights> {
    // Stored name → (tensor spec, its index, part index or None for a whole tensor).
    let mut wanted: HashMap<&str, (&TensorSpec, usize, Option<usize>)> = HashMap::new();
    let mut skipped: HashSet<&str> = HashSet::new();
    for (i, s) in spec.layout.iter().into_iter().enumerate() {
        let names: Vec<(&str, Option<usize>)> = match s.parts.is_empty() {
            true => vec![(s.name.as_str(), None)],
            false => s.parts.iter().enumerate().map(|(p, name)| (name.as_str(), Some(p))).collect(),
        };
        for (name, part) in names {
            match (spec.pick.reads)(i) {
                true => _ = wanted.insert(name, (s, i, part)),
                false => _ = skipped.insert(name),
            }
        }
    }
    let mut found: HashMap<String, Found> = HashMap::new();
    // Scales read before their weights.
    let mut scales: HashMap<String, Found> = HashMap::new();
    let mut dequantized = 0;
    let mut passthrough = Vec::new();
    let mut embed_dtype = None;
    for path in files {
        let file = StoredFile::open(&path)?;
        for (name, info) in file.tensors() {
            if name == spec.layout.embed.name {
                embed_dtype = Some(info.dtype);
            }
            if (spec.passthrough)(&name) {
                let bytes = file.read(&name, info)?;
                passthrough.push(RawTensor { name, dtype: info.dtype, shape: info.shape.clone(), bytes });
                continue;
            }
            if skipped.contains(name.as_str()) {
                continue;
            }
            let Some(&(tensor, index, part)) = wanted.get(name.as_str()) else {
                let scaled = quantized::scaled_weight(&name).and_then(|w| Some((wanted.get(w.as_str())?.1, w)));
                if let Some((index, weight)) = scaled {
                    let bytes = file.read(&name, info)?;
                    let data = match info.dtype {
                        Dtype::F8_E8M0 | Dtype::U8 => Some(quantized::ue8m0(&bytes)),
                        float @ (Dtype::F32 | Dtype::BF16 | Dtype::F16) => decode(float, &bytes),
                        _ => None,
                    };
                    let data = data.ok_or_else(|| {
                        let dtype = info.dtype;
                        Error::new(&path, format!("scale tensor `{name}` has dtype {dtype:?}; kiln reads F32, BF16, F16, F8_E8M0 and U8 scales"))
                    })?;
                    let (dtype, shape, file) = (info.dtype, info.shape.clone(), path.clone());
                    let scale = Found { dtype, shape, data, file, of: (index, None) };
                    match found.get_mut(&weight).filter(|t| quantized::is_quantized(t.dtype)) {
                        Some(t) => {
                            dequantize(&weight, t, &scale, spec)?;
                            dequantized += 1;
                        }
                        None => _ = scales.insert(weight, scale),
                    }
                }
                continue;
            };
            let expected = if part.is_some() { tensor.shape[1..].to_vec() } else { tensor.shape.clone() };
            // Packed fp4 stores two values per byte along the last dimension.
            let mut stored = info.shape.clone();
            if quantized::is_packed_fp4(info.dtype) {
                stored.last_mut().into_iter().for_each(|d| *d *= 2);
            }
            if stored != expected {
                return Err(Error::new(
                    &path,
                    format!("tensor `{name}` has shape {:?}, the config implies {expected:?}", info.shape),
                ));
            }
            let data = decode(info.dtype, &file.read(&name, info)?).ok_or_else(|| {
                Error::new(
                    &path,
                    format!(
                        "tensor `{name}` has dtype {:?}; kiln reads F32, BF16, F16, F8_E4M3 and packed fp4 (I8)",
                        info.dtype
                    ),
                )
            })?;
            let quantized = quantized::is_quantized(info.dtype);
            // A quantized tensor is held whole until its scales come (or are in hand).
            let data = if quantized { data } else { (spec.pick.keep)(index, part, data) };
            let mut t = Found { dtype: info.dtype, shape: expected, data, file: path.clone(), of: (index, part) };
            if let Some(scale) = scales.remove(&name).filter(|_| quantized) {
                dequantize(&name, &mut t, &scale, spec)?;
                dequantized += 1;
            }
            found.insert(name, t);
        }
    }
    if let Some((name, t)) = found.iter().find(|(_, t)| quantized::is_quantized(t.dtype)) {
        return Err(Error::new(
            &t.file,
            format!(
                "{:?} tensor `{name}` has no `{name}_scale_inv` (or `.scale`); kiln reads block-quantized checkpoints only",
                t.dtype
            ),
        ));
    }

    let mut missing = Vec::new();
    let mut take = |name: &str| match found.remove(name) {
        Some(t) => t.data,
        None => {
            missing.push(name.to_string());
            Vec::new()
        }
    };
    let mut index = 0..;
    let tensors = spec.layout.map(|s| {
        let i = index.next().expect("an index per tensor");
        if !(spec.pick.reads)(i) {
            Vec::new()
        } else if s.parts.is_empty() {
            take(&s.name)
        } else {
            s.parts.iter().flat_map(|p| take(p)).collect()
        }
    });
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        return Err(Error::new(source, format!("missing tensor `{}`{more}", shown.join("`, `"))));
    }
    let dtype = match embed_dtype {
        Some(Dtype::BF16) | Some(Dtype::F8_E4M3) | Some(Dtype::I8) => StorageDtype::BF16,
        Some(Dtype::F16) => StorageDtype::F16,
        _ => StorageDtype::F32,
    };
    Ok(LoadedWeights { tensors, dtype, passthrough, dequantized })
}

/// Dequantizes the fp8 or packed-fp4 tensor `t` (stored as `name`) with its scales `scale`
/// (`quantized`), as soon as both are read, and keeps what `spec.pick` keeps of it: a rank
/// never holds more than one whole quantized tensor. `t` is f32 after.
fn dequantize(name: &str, t: &mut Found, scale: &Found, spec: &LoadSpec) -> Result<()> {
    let [rows, cols] = t.shape[..] else {
        return Err(Error::new(&t.file, format!("quantized tensor `{name}` is not a matrix ({:?})", t.shape)));
    };
    let Some(block) = quantized::block_of([rows, cols], &scale.shape, spec.fp8_block) else {
        let [r, c] = spec.fp8_block;
        return Err(Error::new(
            &scale.file,
            format!(
                "the scales of `{name}` have shape {:?}: neither {r}x{c} blocks (the config's) nor whole blocks of the {rows}x{cols} weight",
                scale.shape
            ),
        ));
    };
    quantized::apply_scales(&mut t.data, cols, &scale.data, block);
    t.data = (spec.pick.keep)(t.of.0, t.of.1, std::mem::take(&mut t.data));
    t.dtype = Dtype::F32;
    Ok(())
}

/// Writes `tensors` (named by `layout`) and `passthrough` to the safetensors file `path`,
/// in `dtype` except for tensors kept in f32.
pub fn save(
    path: &Path,
    layout: &Weights<TensorSpec>,
    tensors: &Weights<Vec<f32>>,
    dtype: StorageDtype,
    passthrough: &[RawTensor],
) -> Result<()> {
    save_some(path, layout, tensors, dtype, passthrough, &|_| true)
}

/// `save`, of the tensors whose spec `keep` accepts.
pub fn save_some(
    path: &Path,
    layout: &Weights<TensorSpec>,
    tensors: &Weights<Vec<f32>>,
    dtype: StorageDtype,
    passthrough: &[RawTensor],
    keep: &dyn Fn(&TensorSpec) -> bool,
) -> Result<()> {
    let mut writer = LayoutWriter::create(path, layout, dtype, passthrough, keep)?;
    for (spec, data) in layout.iter().into_iter().zip(tensors.iter()) {
        writer.push(spec, data)?;
    }
    writer.finish()
}

/// A layout's tensors written to a safetensors file as they come (`push`), so the writer holds
/// one at a time: in `dtype` but for tensors kept in f32, those whose spec `keep` accepts (the
/// others pushed are passed over), with `passthrough` as read.
pub struct LayoutWriter {
    file: StreamedFile,
    dtype: StorageDtype,
    kept: HashSet<String>,
}

impl LayoutWriter {
    pub fn create(
        path: &Path,
        layout: &Weights<TensorSpec>,
        dtype: StorageDtype,
        passthrough: &[RawTensor],
        keep: &dyn Fn(&TensorSpec) -> bool,
    ) -> Result<Self> {
        let mut entries = Vec::new();
        let mut kept = HashSet::new();
        for spec in layout.iter().into_iter().filter(|spec| keep(spec)) {
            let dtype = if spec.keep_f32 { StorageDtype::F32 } else { dtype }.safetensors();
            if spec.parts.is_empty() {
                entries.push(Entry { name: spec.name.clone(), dtype, shape: spec.shape.clone() });
            } else {
                entries.extend(spec.parts.iter().map(|name| Entry {
                    name: name.clone(),
                    dtype,
                    shape: spec.shape[1..].to_vec(),
                }));
            }
            kept.insert(spec.name.clone());
        }
        entries.extend(passthrough.iter().map(|t| Entry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        }));
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut file = StreamedFile::create(path, entries, Some(metadata))?;
        for t in passthrough {
            file.write(&t.name, &t.bytes)?;
        }
        Ok(Self { file, dtype, kept })
    }

    /// Writes the tensor of `spec` (its parts, for a stack of experts) if kept.
    pub fn push(&mut self, spec: &TensorSpec, data: &[f32]) -> Result<()> {
        if !self.kept.contains(&spec.name) {
            return Ok(());
        }
        let dtype = if spec.keep_f32 { StorageDtype::F32 } else { self.dtype };
        if spec.parts.is_empty() {
            return self.file.write(&spec.name, &dtype.encode(data));
        }
        let part_len = spec.numel() / spec.parts.len();
        for (name, part) in spec.parts.iter().zip(data.chunks(part_len)) {
            self.file.write(name, &dtype.encode(part))?;
        }
        Ok(())
    }

    /// Closes the file; an error names a kept tensor never pushed.
    pub fn finish(self) -> Result<()> {
        self.file.finish()
    }
}

/// Writes `model.safetensors.index.json` into `dir`: which shard file holds each stored tensor
/// (`weight_map`), and the tensors' total bytes.
pub fn write_index(dir: &Path, weight_map: &BTreeMap<String, String>, total_size: usize) -> Result<()> {
    let path = dir.join("model.safetensors.index.json");
    let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::new(&path, format!("cannot encode: {e}")))?;
    std::fs::write(&path, text).map_err(|e| Error::new(&path, format!("cannot write: {e}")))
}

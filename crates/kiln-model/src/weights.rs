//! The parameter tensors of a Llama-family model: their Hugging Face names and shapes, and
//! loading and saving them as safetensors (single file or sharded with an index).

use crate::config::Config;
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One tensor of a layer; optional ones exist only for some architectures.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    pub input_norm: T,
    pub q: T,
    pub k: T,
    pub v: T,
    pub o: T,
    pub q_bias: Option<T>,
    pub k_bias: Option<T>,
    pub v_bias: Option<T>,
    pub o_bias: Option<T>,
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    pub post_norm: T,
    pub gate: T,
    pub up: T,
    pub down: T,
    pub gate_bias: Option<T>,
    pub up_bias: Option<T>,
    pub down_bias: Option<T>,
}

/// The whole model's tensors; `lm_head` is `None` when tied to `embed`.
#[derive(Clone, Debug)]
pub struct Weights<T> {
    pub embed: T,
    pub layers: Vec<LayerWeights<T>>,
    pub norm: T,
    pub lm_head: Option<T>,
}

/// Applies a macro body to every field, required then optional, in a fixed order.
macro_rules! layer_fields {
    ($m:ident) => {
        $m!(
            [input_norm, q, k, v, o, post_norm, gate, up, down],
            [q_bias, k_bias, v_bias, o_bias, q_norm, k_norm, gate_bias, up_bias, down_bias]
        )
    };
}

impl<T> LayerWeights<T> {
    pub fn map<U>(&self, f: &mut impl FnMut(&T) -> U) -> LayerWeights<U> {
        macro_rules! build {
            ([$($req:ident),*], [$($opt:ident),*]) => {
                LayerWeights { $($req: f(&self.$req),)* $($opt: self.$opt.as_ref().map(&mut *f),)* }
            };
        }
        layer_fields!(build)
    }
    fn refs(&self) -> Vec<&T> {
        macro_rules! list {
            ([$($req:ident),*], [$($opt:ident),*]) => {{
                let mut v = vec![$(&self.$req),*];
                $(v.extend(self.$opt.as_ref());)*
                v
            }};
        }
        layer_fields!(list)
    }
    fn refs_mut(&mut self) -> Vec<&mut T> {
        macro_rules! list {
            ([$($req:ident),*], [$($opt:ident),*]) => {{
                let mut v = vec![$(&mut self.$req),*];
                $(v.extend(self.$opt.as_mut());)*
                v
            }};
        }
        layer_fields!(list)
    }
}

impl<T> Weights<T> {
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Weights<U> {
        Weights {
            embed: f(&self.embed),
            layers: self.layers.iter().map(|l| l.map(&mut f)).collect(),
            norm: f(&self.norm),
            lm_head: self.lm_head.as_ref().map(&mut f),
        }
    }
    /// Every tensor, in a fixed order shared by all `Weights` of the same config.
    pub fn iter(&self) -> Vec<&T> {
        let mut v = vec![&self.embed];
        self.layers.iter().for_each(|l| v.extend(l.refs()));
        v.push(&self.norm);
        v.extend(self.lm_head.as_ref());
        v
    }
    pub fn iter_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.embed];
        self.layers.iter_mut().for_each(|l| v.extend(l.refs_mut()));
        v.push(&mut self.norm);
        v.extend(self.lm_head.as_mut());
        v
    }
}

/// A tensor's Hugging Face name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Names and shapes of every parameter for `cfg`.
pub fn layout(cfg: &Config) -> Weights<TensorSpec> {
    let spec = |name: String, shape: &[usize]| TensorSpec { name, shape: shape.to_vec() };
    let (d, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let opt = |on: bool, s: &str, shape: &[usize]| on.then(|| spec(p(s), shape));
            LayerWeights {
                input_norm: spec(p("input_layernorm.weight"), &[d]),
                q: spec(p("self_attn.q_proj.weight"), &[q_out, d]),
                k: spec(p("self_attn.k_proj.weight"), &[kv_out, d]),
                v: spec(p("self_attn.v_proj.weight"), &[kv_out, d]),
                o: spec(p("self_attn.o_proj.weight"), &[d, q_out]),
                q_bias: opt(cfg.qkv_bias, "self_attn.q_proj.bias", &[q_out]),
                k_bias: opt(cfg.qkv_bias, "self_attn.k_proj.bias", &[kv_out]),
                v_bias: opt(cfg.qkv_bias, "self_attn.v_proj.bias", &[kv_out]),
                o_bias: opt(cfg.o_bias, "self_attn.o_proj.bias", &[d]),
                q_norm: opt(cfg.qk_norm, "self_attn.q_norm.weight", &[hd]),
                k_norm: opt(cfg.qk_norm, "self_attn.k_norm.weight", &[hd]),
                post_norm: spec(p("post_attention_layernorm.weight"), &[d]),
                gate: spec(p("mlp.gate_proj.weight"), &[ff, d]),
                up: spec(p("mlp.up_proj.weight"), &[ff, d]),
                down: spec(p("mlp.down_proj.weight"), &[d, ff]),
                gate_bias: opt(cfg.mlp_bias, "mlp.gate_proj.bias", &[ff]),
                up_bias: opt(cfg.mlp_bias, "mlp.up_proj.bias", &[ff]),
                down_bias: opt(cfg.mlp_bias, "mlp.down_proj.bias", &[d]),
            }
        })
        .collect();
    Weights {
        embed: spec("model.embed_tokens.weight".into(), &[cfg.vocab_size, d]),
        layers,
        norm: spec("model.norm.weight".into(), &[d]),
        lm_head: (!cfg.tie_word_embeddings).then(|| spec("lm_head.weight".into(), &[cfg.vocab_size, d])),
    }
}

/// Storage dtypes kiln reads and writes.
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

fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Tensors read from a model directory, converted to f32 once.
pub struct LoadedWeights {
    pub tensors: Weights<Vec<f32>>,
    /// The dtype the checkpoint stored its embedding in, used again when saving.
    pub dtype: StorageDtype,
}

/// Loads every tensor of `layout` from `dir/model.safetensors` or the shards listed by
/// `dir/model.safetensors.index.json`, memory-mapped.
pub fn load(dir: &Path, layout: &Weights<TensorSpec>) -> Result<LoadedWeights> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    // Which file holds which tensor.
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
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
            files.entry(file.to_string()).or_default().push(name.clone());
        }
    } else if single.exists() {
        files.insert("model.safetensors".into(), vec![]);
    } else {
        return Err(Error::new(dir, "no model.safetensors or model.safetensors.index.json in the model directory"));
    }

    load_files(dir, files.keys().map(|f| dir.join(f)), layout)
}

/// Loads every tensor of `layout` from one safetensors file.
pub fn load_file(path: &Path, layout: &Weights<TensorSpec>) -> Result<LoadedWeights> {
    load_files(path, std::iter::once(path.to_path_buf()), layout)
}

/// Loads every tensor of `layout` from the union of `files`; `source` names them in errors.
fn load_files(
    source: &Path,
    files: impl Iterator<Item = std::path::PathBuf>,
    layout: &Weights<TensorSpec>,
) -> Result<LoadedWeights> {
    let mut found: HashMap<String, (Dtype, Vec<usize>, Vec<f32>)> = HashMap::new();
    let wanted: HashMap<&str, &TensorSpec> = layout.iter().into_iter().map(|s| (s.name.as_str(), s)).collect();
    for path in files {
        let handle = std::fs::File::open(&path).map_err(|e| Error::new(&path, format!("cannot open shard: {e}")))?;
        // SAFETY: the file is only read, and not expected to change while loading.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::new(&path, format!("cannot map: {e}")))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::new(&path, format!("invalid safetensors: {e}")))?;
        for (name, view) in st.tensors() {
            let Some(spec) = wanted.get(name.as_str()) else { continue };
            let data = decode(view.dtype(), view.data()).ok_or_else(|| {
                Error::new(&path, format!("tensor `{name}` has dtype {:?}; kiln reads F32, BF16 and F16", view.dtype()))
            })?;
            if view.shape() != spec.shape.as_slice() {
                return Err(Error::new(
                    &path,
                    format!("tensor `{name}` has shape {:?}, the config implies {:?}", view.shape(), spec.shape),
                ));
            }
            found.insert(name, (view.dtype(), view.shape().to_vec(), data));
        }
    }
    let embed_dtype = found.get(&layout.embed.name).map(|t| t.0);
    let mut missing = Vec::new();
    let tensors = layout.map(|spec| match found.remove(&spec.name) {
        Some((_, _, data)) => data,
        None => {
            missing.push(spec.name.clone());
            Vec::new()
        }
    });
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        return Err(Error::new(source, format!("missing tensor `{}`{more}", shown.join("`, `"))));
    }
    let dtype = match embed_dtype {
        Some(Dtype::BF16) => StorageDtype::BF16,
        Some(Dtype::F16) => StorageDtype::F16,
        _ => StorageDtype::F32,
    };
    Ok(LoadedWeights { tensors, dtype })
}

/// Writes `tensors` (named by `layout`) to the safetensors file `path` in `dtype`.
pub fn save(path: &Path, layout: &Weights<TensorSpec>, tensors: &Weights<Vec<f32>>, dtype: StorageDtype) -> Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = layout
        .iter()
        .into_iter()
        .zip(tensors.iter())
        .map(|(spec, data)| (spec.name.clone(), spec.shape.clone(), dtype.encode(data)))
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype.safetensors(), shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::new(path, format!("cannot encode tensors: {e}")))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| Error::new(path, format!("cannot write: {e}")))
}

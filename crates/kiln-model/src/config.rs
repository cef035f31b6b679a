//! `config.json` of the Llama family (`llama`, `mistral`, `qwen2`, `qwen3`), field for field
//! as transformers reads it, with transformers' defaults.

use crate::error::{Error, Result};
use crate::rope::RopeScaling;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The architectures this module builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl ModelType {
    pub const ALL: [&'static str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

    fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }
}

/// `config.json` as written by transformers; fields it does not use here are ignored.
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    max_position_embeddings: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    rope_parameters: Option<Map<String, Value>>,
    partial_rotary_factor: Option<f64>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// A resolved, validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    pub rope: RopeScaling,
    pub rope_theta: f64,
    /// Rotated features per head (`head_dim · partial_rotary_factor`).
    pub rot_dim: usize,
    /// Sliding attention window of each layer, `None` for full attention.
    pub layer_windows: Vec<Option<usize>>,
}

impl Config {
    /// Reads `config.json` (or the directory holding it).
    pub fn load(path: &Path) -> Result<Self> {
        let path = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::new(&path, format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(|m| Error::new(&path, m))
    }

    /// Parses the text of a `config.json`; the error message names the field at fault.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))?;
        let model_type = ModelType::parse(&raw.model_type).ok_or_else(|| {
            format!("unsupported model_type `{}` (supported: {})", raw.model_type, ModelType::ALL.join(", "))
        })?;
        if raw.hidden_act != "silu" {
            return Err(format!("field `hidden_act`: `{}` is not supported (only `silu`)", raw.hidden_act));
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "fields `num_attention_heads` ({heads}) and `num_key_value_heads` ({kv_heads}): query heads must be a positive multiple of kv heads"
            ));
        }
        let head_dim = match (model_type, raw.head_dim) {
            (ModelType::Qwen3, None) => 128,
            (_, Some(d)) => d,
            (_, None) if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            _ => {
                return Err(format!(
                    "field `hidden_size` ({}) is not divisible by `num_attention_heads` ({heads})",
                    raw.hidden_size
                ))
            }
        };
        let max_pos = raw.max_position_embeddings.unwrap_or(match model_type {
            ModelType::Llama => 2048,
            ModelType::Mistral => 4096 * 32,
            ModelType::Qwen2 | ModelType::Qwen3 => 32768,
        });

        // transformers: `rope_parameters` (or the legacy `rope_scaling`) wins; `rope_theta` and
        // `partial_rotary_factor` at top level fill what it leaves out.
        let params = raw.rope_parameters.or(raw.rope_scaling).unwrap_or_default();
        let rope_theta = match params.get("rope_theta") {
            Some(v) => v.as_f64().ok_or("field `rope_parameters.rope_theta`: expected a number")?,
            None => raw.rope_theta.unwrap_or(10_000.0),
        };
        let partial = match params.get("partial_rotary_factor") {
            Some(v) => v.as_f64().ok_or("field `rope_parameters.partial_rotary_factor`: expected a number")?,
            None => raw.partial_rotary_factor.unwrap_or(1.0),
        };
        let rot_dim = (head_dim as f64 * partial) as usize;
        if !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
            return Err(format!(
                "field `partial_rotary_factor` ({partial}) gives an odd or too large rotary dim {rot_dim}"
            ));
        }
        let rope = RopeScaling::parse(&params, max_pos)?;

        let layer_windows = match model_type {
            ModelType::Llama => vec![None; raw.num_hidden_layers],
            ModelType::Mistral => vec![raw.sliding_window; raw.num_hidden_layers],
            ModelType::Qwen2 | ModelType::Qwen3 => {
                let window =
                    if raw.use_sliding_window.unwrap_or(false) { raw.sliding_window.or(Some(4096)) } else { None };
                let max_window_layers = raw.max_window_layers.unwrap_or(28);
                let types = raw.layer_types.clone().unwrap_or_else(|| {
                    (0..raw.num_hidden_layers)
                        .map(|i| {
                            if window.is_some() && i >= max_window_layers {
                                "sliding_attention"
                            } else {
                                "full_attention"
                            }
                            .to_string()
                        })
                        .collect()
                });
                if types.len() != raw.num_hidden_layers {
                    return Err(format!(
                        "field `layer_types` has {} entries for {} layers",
                        types.len(),
                        raw.num_hidden_layers
                    ));
                }
                types.iter().map(|t| if t == "sliding_attention" { window } else { None }).collect()
            }
        };

        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            ModelType::Llama => (raw.attention_bias, raw.attention_bias, raw.mlp_bias),
            ModelType::Qwen3 => (raw.attention_bias, raw.attention_bias, false),
            ModelType::Qwen2 => (true, false, false),
            ModelType::Mistral => (false, false, false),
        };
        Ok(Self {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps as f32,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: model_type == ModelType::Qwen3,
            max_position_embeddings: max_pos,
            rope,
            rope_theta,
            rot_dim,
            layer_windows,
        })
    }

    /// Number of parameters, counting tied embeddings once.
    pub fn num_parameters(&self) -> usize {
        crate::weights::layout(self).iter().into_iter().map(|s| s.numel()).sum()
    }
}

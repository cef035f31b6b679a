//! `config.json` of the Llama family (`llama`, `mistral`, `qwen2`, `qwen3`), of `deepseek_v3`
//! and of `deepseek_v4` (its own fields in `config_v4`), field for field as transformers reads
//! it, with transformers' defaults.

use crate::error::{Error, Result};
use crate::rope::{number, yarn_mscale, RopeScaling};
pub use kiln_core::Scoring;
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
    #[serde(rename = "deepseek_v3")]
    DeepseekV3,
    #[serde(rename = "deepseek_v4")]
    DeepseekV4,
}

impl ModelType {
    pub const ALL: [&'static str; 6] = ["llama", "mistral", "qwen2", "qwen3", "deepseek_v3", "deepseek_v4"];

    fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "deepseek_v3" => Some(Self::DeepseekV3),
            "deepseek_v4" => Some(Self::DeepseekV4),
            _ => None,
        }
    }
}

/// `config.json` as written by transformers; fields it does not use here are ignored.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    /// Absent in `deepseek_v4`, whose only dense MLP is the shared expert.
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) num_key_value_heads: Option<usize>,
    pub(crate) head_dim: Option<usize>,
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
    pub(crate) rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    pub(crate) rope_parameters: Option<Map<String, Value>>,
    pub(crate) partial_rotary_factor: Option<f64>,
    pub(crate) sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    pub(crate) layer_types: Option<Vec<String>>,
    // deepseek_v3
    /// Absent means transformers' default (1536), `null` a plain query projection.
    #[serde(default, deserialize_with = "present")]
    pub(crate) q_lora_rank: Option<Value>,
    pub(crate) scoring_func: Option<String>,
    topk_method: Option<String>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    pub(crate) qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
    pub(crate) moe_intermediate_size: Option<usize>,
    pub(crate) n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    pub(crate) num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    norm_topk_prob: Option<bool>,
    pub(crate) routed_scaling_factor: Option<f64>,
    first_k_dense_replace: Option<usize>,
    num_nextn_predict_layers: Option<usize>,
    #[serde(flatten)]
    pub(crate) v4: crate::config_v4::RawV4,
    quantization_config: Option<Map<String, Value>>,
    #[serde(default)]
    architectures: Vec<String>,
    num_labels: Option<usize>,
    id2label: Option<Map<String, Value>>,
    pad_token_id: Option<i64>,
}

/// `Some(value)` for a field that is present, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// A router's `scoring_func`.
fn scoring(name: &str) -> std::result::Result<Scoring, String> {
    match name {
        "sigmoid" => Ok(Scoring::Sigmoid),
        "sqrtsoftplus" => Ok(Scoring::SqrtSoftplus),
        other => Err(format!("field `scoring_func`: `{other}` is not supported (sigmoid, sqrtsoftplus)")),
    }
}

/// Multi-head latent attention sizes (DeepSeek-V2/V3).
#[derive(Clone, Debug, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` for a plain query projection.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// RoPE pairs are `(2i, 2i+1)` (`rope_interleave`, the published checkpoints).
    pub rope_interleave: bool,
}

/// How a layer attends.
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionKind {
    /// Grouped-query attention with `head_dim`-wide heads (Llama family).
    Gqa,
    Mla(MlaConfig),
    /// DeepSeek-V4: low-rank queries, one shared key/value head, sinks, compressed entries.
    V4(crate::config_v4::V4Config),
}

/// DeepSeekMoE feed-forward sizes and routing.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub scoring: Scoring,
    pub experts: usize,
    pub expert_ff: usize,
    pub shared_experts: usize,
    pub top_k: usize,
    pub groups: usize,
    pub top_groups: usize,
    pub normalize: bool,
    pub routed_scaling_factor: f32,
    /// The first `first_k_dense_replace` layers keep a dense MLP of `intermediate_size`.
    pub first_dense_layers: usize,
    /// Clamp of every expert's gate (above) and up (both sides) projections before SwiGLU
    /// (DeepSeek-V4's `swiglu_limit`); infinite for none.
    pub swiglu_limit: f32,
}

fn mla_config(raw: &RawConfig) -> std::result::Result<MlaConfig, String> {
    let q_lora_rank = match &raw.q_lora_rank {
        None => Some(1536),
        Some(Value::Null) => None,
        Some(v) => {
            Some(v.as_u64().ok_or_else(|| format!("field `q_lora_rank`: expected an integer or null, got {v}"))?
                as usize)
        }
    };
    let m = MlaConfig {
        q_lora_rank,
        kv_lora_rank: raw.kv_lora_rank.unwrap_or(512),
        qk_nope_head_dim: raw.qk_nope_head_dim.unwrap_or(128),
        qk_rope_head_dim: raw.qk_rope_head_dim.unwrap_or(64),
        v_head_dim: raw.v_head_dim.unwrap_or(128),
        rope_interleave: raw.rope_interleave.unwrap_or(true),
    };
    if !m.qk_rope_head_dim.is_multiple_of(2) {
        return Err(format!("field `qk_rope_head_dim` ({}) must be even", m.qk_rope_head_dim));
    }
    if raw.num_key_value_heads.is_some_and(|kv| kv != raw.num_attention_heads) {
        return Err("field `num_key_value_heads`: multi-head latent attention has one kv head per query head".into());
    }
    Ok(m)
}

/// transformers' `DeepseekV3Config` defaults fill absent fields.
fn moe_config(raw: &RawConfig) -> std::result::Result<MoeConfig, String> {
    if let Some(f) = raw.scoring_func.as_deref().filter(|&f| f != "sigmoid") {
        return Err(format!("field `scoring_func`: `{f}` is not supported (DeepSeek-V3 routes with `sigmoid`)"));
    }
    if let Some(m) = raw.topk_method.as_deref().filter(|&m| m != "noaux_tc") {
        return Err(format!("field `topk_method`: `{m}` is not supported (DeepSeek-V3 uses `noaux_tc`)"));
    }
    Ok(MoeConfig {
        scoring: Scoring::Sigmoid,
        experts: raw.n_routed_experts.unwrap_or(256),
        expert_ff: raw.moe_intermediate_size.unwrap_or(2048),
        shared_experts: raw.n_shared_experts.unwrap_or(1),
        top_k: raw.num_experts_per_tok.unwrap_or(8),
        groups: raw.n_group.unwrap_or(8),
        top_groups: raw.topk_group.unwrap_or(4),
        normalize: raw.norm_topk_prob.unwrap_or(true),
        routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(2.5) as f32,
        first_dense_layers: raw.first_k_dense_replace.unwrap_or(3),
        swiglu_limit: f32::INFINITY,
    })
}

/// transformers' `DeepseekV4Config` defaults fill absent fields. V4 normalises the chosen
/// weights whatever `norm_topk_prob` says, routes without groups, and has one shared expert of
/// `moe_intermediate_size` whatever `n_shared_experts` says.
fn v4_moe_config(raw: &RawConfig) -> std::result::Result<MoeConfig, String> {
    let m = MoeConfig {
        scoring: scoring(raw.scoring_func.as_deref().unwrap_or("sqrtsoftplus"))?,
        experts: raw.n_routed_experts.unwrap_or(256),
        expert_ff: raw.moe_intermediate_size.unwrap_or(2048),
        shared_experts: 1,
        top_k: raw.num_experts_per_tok.unwrap_or(6),
        groups: 1,
        top_groups: 1,
        normalize: true,
        routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.5) as f32,
        first_dense_layers: 0,
        swiglu_limit: raw.v4.swiglu_limit.unwrap_or(10.0) as f32,
    };
    if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
        return Err(format!(
            "fields `n_routed_experts` ({}) and `num_experts_per_tok` ({}): top-k must pick among the experts",
            m.experts, m.top_k
        ));
    }
    Ok(m)
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
    pub attention: AttentionKind,
    /// Softmax scale of the attention scores.
    pub attention_scale: f32,
    /// Mixture-of-experts layers, for `deepseek_v3`.
    pub moe: Option<MoeConfig>,
    /// DeepSeek's multi-token-prediction layers after the last decoder layer; their tensors
    /// are carried through unchanged.
    pub mtp_layers: usize,
    /// Block of one scale in fp8 checkpoints.
    pub fp8_block: [usize; 2],
    /// Outputs per sequence of a `...ForSequenceClassification` model (a reward model has
    /// one), read from its last token; `None` for a causal LM.
    pub num_labels: Option<usize>,
    pub pad_token_id: Option<i64>,
    /// Under pipeline parallel, the part of the model one stage holds (`num_layers` and
    /// `layer_windows` are then the stage's); `None` for a whole model.
    pub stage: Option<Stage>,
    /// Under tensor parallel with sequence parallel, this rank's place in the tensor group
    /// (rank, size): training activations keep the residual stream of its block of the tokens
    /// only (`sequence_parallel`); `None` otherwise.
    pub sequence_parallel: Option<(usize, usize)>,
}

/// The part of a model a pipeline stage holds: its layers (`layers[l]` is the whole model's
/// index of its layer `l`: one run of the model's layers, or with interleaved stages one run
/// per virtual stage), the embedding (the first stage, and the last when the head is tied to
/// it) and the final norm and head (the last stage). What it does not hold it lays out with
/// no values.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub layers: Vec<usize>,
    pub embedding: bool,
    pub head: bool,
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
        // DeepSeek-V4 attends one shared key/value head.
        let kv_heads = raw.num_key_value_heads.unwrap_or(if model_type == ModelType::DeepseekV4 { 1 } else { heads });
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "fields `num_attention_heads` ({heads}) and `num_key_value_heads` ({kv_heads}): query heads must be a positive multiple of kv heads"
            ));
        }
        let deepseek = model_type == ModelType::DeepseekV3;
        let mla = if deepseek { Some(mla_config(&raw)?) } else { None };
        let head_dim = match (model_type, raw.head_dim) {
            // q and k heads are [nope ; rope] wide.
            (ModelType::DeepseekV3, _) => mla.as_ref().map_or(0, |m| m.qk_nope_head_dim + m.qk_rope_head_dim),
            (ModelType::DeepseekV4, d) => d.unwrap_or(512),
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
            ModelType::DeepseekV3 => 4096,
            ModelType::DeepseekV4 => 1 << 20,
        });
        let v4 = match model_type {
            ModelType::DeepseekV4 => Some(crate::config_v4::v4_config(&raw, raw.num_hidden_layers, max_pos)?),
            _ => None,
        };

        // transformers: `rope_parameters` (or the legacy `rope_scaling`) wins; `rope_theta` and
        // `partial_rotary_factor` at top level fill what it leaves out.
        let params = raw.rope_parameters.clone().or(raw.rope_scaling.clone()).unwrap_or_default();
        let rope_theta = match params.get("rope_theta") {
            Some(v) => v.as_f64().ok_or("field `rope_parameters.rope_theta`: expected a number")?,
            None => raw.rope_theta.unwrap_or(10_000.0),
        };
        let partial = match params.get("partial_rotary_factor") {
            Some(v) => v.as_f64().ok_or("field `rope_parameters.partial_rotary_factor`: expected a number")?,
            None => raw.partial_rotary_factor.unwrap_or(1.0),
        };
        let rot_dim = match (&mla, &v4) {
            (Some(m), _) => m.qk_rope_head_dim,
            (_, Some((_, _, _, _, rot_dim))) => *rot_dim,
            _ => (head_dim as f64 * partial) as usize,
        };
        if !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
            return Err(format!(
                "field `partial_rotary_factor` ({partial}) gives an odd or too large rotary dim {rot_dim}"
            ));
        }
        let (rope, rope_theta) = match &v4 {
            Some((_, _, rope, theta, _)) => (rope.clone(), *theta),
            None => (RopeScaling::parse(&params, max_pos)?, rope_theta),
        };

        let layer_windows = match model_type {
            ModelType::Llama | ModelType::DeepseekV3 => vec![None; raw.num_hidden_layers],
            ModelType::DeepseekV4 => vec![v4.as_ref().map(|v| v.0.window); raw.num_hidden_layers],
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
            // `attention_bias` biases q_a, kv_a and o in MLA; kept as `o_bias`.
            ModelType::DeepseekV3 => (false, raw.attention_bias, false),
            ModelType::DeepseekV4 => (false, false, false),
        };
        // transformers: head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)² for MLA.
        let mut attention_scale = 1.0 / (head_dim as f64).sqrt();
        if deepseek && rope != RopeScaling::Default {
            if let (Some(factor), Some(all_dim)) = (number(&params, "factor")?, number(&params, "mscale_all_dim")?) {
                if all_dim != 0.0 {
                    let m = yarn_mscale(factor, all_dim);
                    attention_scale *= m * m;
                }
            }
        }
        let moe = match model_type {
            ModelType::DeepseekV3 => Some(moe_config(&raw)?),
            ModelType::DeepseekV4 => Some(v4_moe_config(&raw)?),
            _ => None,
        };
        if let Some(m) = &moe {
            if m.experts == 0 || !m.experts.is_multiple_of(m.groups) || m.top_groups > m.groups || m.top_k > m.experts {
                return Err(format!(
                    "fields `n_routed_experts` ({}), `n_group` ({}), `topk_group` ({}), `num_experts_per_tok` ({}): experts must split evenly into groups and top-k fit the kept groups",
                    m.experts, m.groups, m.top_groups, m.top_k
                ));
            }
            if m.top_k > m.top_groups * (m.experts / m.groups) {
                return Err(format!(
                    "field `num_experts_per_tok` ({}) exceeds the experts of `topk_group` groups",
                    m.top_k
                ));
            }
        }
        let intermediate_size = match (raw.intermediate_size, &moe) {
            (Some(ff), _) => ff,
            // V4's only dense MLP is its shared expert.
            (None, Some(m)) if model_type == ModelType::DeepseekV4 => m.expert_ff,
            (None, _) => return Err("field `intermediate_size` is missing".into()),
        };
        let fp8_block = match raw.quantization_config.as_ref().and_then(|q| q.get("weight_block_size")) {
            None => [128, 128],
            Some(v) => match v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).as_deref() {
                Some(&[r, c]) if r > 0 && c > 0 => [r as usize, c as usize],
                _ => {
                    return Err(format!(
                        "field `quantization_config.weight_block_size`: expected two positive integers, got {v}"
                    ))
                }
            },
        };
        Ok(Self {
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size,
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
            attention: match (mla, v4) {
                (Some(m), _) => AttentionKind::Mla(m),
                (_, Some((v4, ..))) => AttentionKind::V4(v4),
                _ => AttentionKind::Gqa,
            },
            attention_scale: attention_scale as f32,
            moe,
            mtp_layers: match model_type {
                ModelType::DeepseekV3 | ModelType::DeepseekV4 => raw.num_nextn_predict_layers.unwrap_or(1),
                _ => 0,
            },
            fp8_block,
            num_labels: raw
                .architectures
                .iter()
                .any(|a| a.ends_with("ForSequenceClassification"))
                // transformers: `num_labels`, else the size of `id2label`, else 2.
                .then(|| raw.num_labels.or(raw.id2label.as_ref().map(Map::len)).unwrap_or(2)),
            pad_token_id: raw.pad_token_id,
            stage: None,
            sequence_parallel: None,
        })
    }

    /// Whether layer `l` has a mixture-of-experts feed-forward block.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| self.whole_layer(l) >= m.first_dense_layers)
    }

    /// The index in the whole model of this config's layer `l` (`l` but for a pipeline stage).
    pub fn whole_layer(&self, l: usize) -> usize {
        self.stage.as_ref().map_or(l, |s| s.layers[l])
    }

    /// Whether a stored tensor is read and written back unchanged: multi-token-prediction
    /// layers, and DeepSeek-V4's frozen token-to-expert tables (`ffn.gate.tid2eid`, int64).
    pub fn is_carried_tensor(&self, name: &str) -> bool {
        self.is_mtp_tensor(name) || name.starts_with("mtp.") || Self::is_hash_table(name)
    }

    /// Whether a stored tensor is a DeepSeek-V4 hash layer's token-to-expert table: carried,
    /// but also read by the forward.
    pub fn is_hash_table(name: &str) -> bool {
        name.ends_with(".ffn.gate.tid2eid")
    }

    /// Whether a stored tensor belongs to a multi-token-prediction layer (carried through).
    fn is_mtp_tensor(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix("model.layers.") else { return false };
        let layer = rest.split('.').next().and_then(|l| l.parse::<usize>().ok());
        layer.is_some_and(|l| l >= self.num_layers && l < self.num_layers + self.mtp_layers)
    }

    /// Number of parameters, counting tied embeddings once.
    pub fn num_parameters(&self) -> usize {
        crate::weights::layout(self).iter().into_iter().map(|s| s.numel()).sum()
    }
}

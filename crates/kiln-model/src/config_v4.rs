//! DeepSeek-V4's own `config.json` fields, as transformers' `DeepseekV4Config` resolves them
//! (its legacy names too: `compress_ratios`, `compress_rate_csa`/`_hca`, `num_hash_layers`,
//! `qk_rope_head_dim`).

use crate::config::RawConfig;
use crate::rope::RopeScaling;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The `deepseek_v4` fields of `config.json`; absent ones take transformers' defaults.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct RawV4 {
    compress_rates: Option<Map<String, Value>>,
    compress_ratios: Option<Vec<usize>>,
    compress_rate_csa: Option<usize>,
    compress_rate_hca: Option<usize>,
    compress_rope_theta: Option<f64>,
    hc_mult: Option<usize>,
    hc_sinkhorn_iters: Option<usize>,
    hc_eps: Option<f64>,
    mlp_layer_types: Option<Vec<String>>,
    num_hash_layers: Option<usize>,
    pub(crate) swiglu_limit: Option<f64>,
    o_groups: Option<usize>,
    o_lora_rank: Option<usize>,
    index_n_heads: Option<usize>,
    index_head_dim: Option<usize>,
    index_topk: Option<usize>,
}

/// A V4 layer's attention (`layer_types`): every kind attends a sliding window of the
/// sequence; the compressed kinds also attend entries that each summarise `rate` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Attention {
    Sliding,
    /// Compressed sparse attention: overlapping windows of `rate`, the lightning indexer
    /// keeping the top `index_topk` entries per query.
    Sparse {
        rate: usize,
    },
    /// Heavily compressed attention: disjoint windows of `rate`, every entry attended.
    Heavy {
        rate: usize,
    },
}

impl V4Attention {
    /// Tokens per compressed entry, none for sliding layers.
    pub fn rate(self) -> Option<usize> {
        self.compression().map(|c| c.rate)
    }
    /// How the layer pools its entries, none for sliding layers.
    pub fn compression(self) -> Option<Compression> {
        match self {
            Self::Sliding => None,
            Self::Sparse { rate } => Some(Compression { rate, overlap: true }),
            Self::Heavy { rate } => Some(Compression { rate, overlap: false }),
        }
    }
}

/// A compressed layer's pooling: windows of `rate` tokens, overlapping (CSA: each entry also
/// pools the window before) or not (HCA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Compression {
    pub rate: usize,
    pub overlap: bool,
}

impl Compression {
    /// Projected series per token: 2 with overlapping windows, else 1.
    pub fn series(self) -> usize {
        if self.overlap {
            2
        } else {
            1
        }
    }
}

/// Manifold-constrained hyper-connections: `streams` residual streams per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HcConfig {
    pub streams: usize,
    pub sinkhorn_iters: usize,
    pub eps: f32,
}

/// DeepSeek-V4's attention, hyper-connection and routing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct V4Config {
    pub q_lora_rank: usize,
    /// The output projection: heads split into `o_groups` groups, each projected to
    /// `o_lora_rank`, then all mixed to the hidden size.
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub layers: Vec<V4Attention>,
    pub window: usize,
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// Rotary settings of the compressed layers and their compressors (`rope_parameters
    /// ["compress"]`); sliding layers use the model's `rope`/`rope_theta` ("main").
    pub compress_rope: RopeScaling,
    pub compress_rope_theta: f64,
    pub hc: HcConfig,
    /// Layers routed by the frozen token-to-expert table `tid2eid` (`hash_moe`).
    pub hash_layers: Vec<bool>,
}

impl V4Config {
    /// The distinct compressions of the layers, in order.
    pub fn compressions(&self) -> Vec<Compression> {
        let mut kinds: Vec<Compression> = self.layers.iter().filter_map(|l| l.compression()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }
}

/// transformers' defaults: DeepSeek-V4-Flash's.
const DEFAULT_ROPE_HEAD_DIM: f64 = 64.0;
const DEFAULT_HASH_LAYERS: usize = 3;

/// The resolved V4 settings, the head dim, the main rope (scaling, theta, rotary dim).
pub(crate) fn v4_config(
    raw: &RawConfig,
    layers: usize,
    max_pos: usize,
) -> Result<(V4Config, usize, RopeScaling, f64, usize), String> {
    let r = &raw.v4;
    let head_dim = raw.head_dim.unwrap_or(512);
    if raw.num_key_value_heads.is_some_and(|kv| kv != 1) {
        return Err("field `num_key_value_heads`: DeepSeek-V4 attends one shared key/value head".into());
    }
    let rates = |kind: &str, legacy: Option<usize>, default: usize| -> Result<usize, String> {
        let given = r.compress_rates.as_ref().and_then(|m| m.get(kind));
        let rate = match (legacy, given) {
            (Some(rate), _) => rate,
            (None, Some(v)) => {
                v.as_u64().ok_or_else(|| format!("field `compress_rates.{kind}`: expected an integer, got {v}"))?
                    as usize
            }
            (None, None) => default,
        };
        if rate < 1 {
            return Err(format!("field `compress_rates.{kind}` must be at least 1"));
        }
        Ok(rate)
    };
    let csa = rates("compressed_sparse_attention", r.compress_rate_csa, 4)?;
    let hca = rates("heavily_compressed_attention", r.compress_rate_hca, 128)?;
    let kinds: Vec<V4Attention> = match (&raw.layer_types, &r.compress_ratios) {
        (Some(types), _) => types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(V4Attention::Sliding),
                "compressed_sparse_attention" => Ok(V4Attention::Sparse { rate: csa }),
                "heavily_compressed_attention" => Ok(V4Attention::Heavy { rate: hca }),
                other => Err(format!(
                    "field `layer_types`: `{other}` is not one of sliding_attention, compressed_sparse_attention, heavily_compressed_attention"
                )),
            })
            .collect::<Result<_, _>>()?,
        (None, Some(ratios)) => ratios
            .iter()
            .map(|&r| match r {
                0 => Ok(V4Attention::Sliding),
                4 => Ok(V4Attention::Sparse { rate: csa }),
                128 => Ok(V4Attention::Heavy { rate: hca }),
                other => Err(format!("field `compress_ratios`: {other} is not one of 0, 4, 128")),
            })
            .collect::<Result<_, _>>()?,
        // transformers: two heavily compressed layers, then compressed sparse and heavily
        // compressed in turn.
        (None, None) => (0..layers)
            .map(|i| match i {
                0 | 1 => V4Attention::Heavy { rate: hca },
                i if (i - 2) % 2 == 1 => V4Attention::Sparse { rate: csa },
                _ => V4Attention::Heavy { rate: hca },
            })
            .collect(),
    };
    if kinds.len() < layers {
        return Err(format!("field `layer_types` has {} entries for {layers} layers", kinds.len()));
    }
    let hash_layers: Vec<bool> = match &r.mlp_layer_types {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                "hash_moe" => Ok(true),
                "moe" => Ok(false),
                other => Err(format!("field `mlp_layer_types`: `{other}` is not one of hash_moe, moe")),
            })
            .collect::<Result<_, _>>()?,
        None => (0..layers).map(|l| l < r.num_hash_layers.unwrap_or(DEFAULT_HASH_LAYERS)).collect(),
    };
    if hash_layers.len() < layers {
        return Err(format!("field `mlp_layer_types` has {} entries for {layers} layers", hash_layers.len()));
    }

    let partial = match (raw.partial_rotary_factor, raw.qk_rope_head_dim) {
        (Some(p), _) => p,
        (None, Some(rope)) => rope as f64 / head_dim as f64,
        (None, None) => DEFAULT_ROPE_HEAD_DIM / 512.0,
    };
    let rot_dim = (head_dim as f64 * partial) as usize;
    if !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
        return Err(format!(
            "field `partial_rotary_factor` ({partial}) gives an odd or too large rotary dim {rot_dim}"
        ));
    }
    // `rope_parameters` nested as {"main": …, "compress": …}, or flat: its keys (yarn) are the
    // compressed layers', with `compress_rope_theta`, and the main rope is plain.
    let params = raw.rope_parameters.clone().unwrap_or_default();
    let nested = |key: &str| params.get(key).and_then(Value::as_object).cloned();
    let theta = |p: &Map<String, Value>, default: f64| -> Result<f64, String> {
        match p.get("rope_theta") {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| format!("field `rope_parameters.rope_theta`: expected a number, got {v}"))
            }
        }
    };
    let main_theta_default = raw.rope_theta.unwrap_or(10_000.0);
    let compress_theta_default = r.compress_rope_theta.unwrap_or(160_000.0);
    let (main, compress) = match (nested("main"), nested("compress")) {
        (Some(main), Some(compress)) => (main, compress),
        _ => {
            let mut compress: Map<String, Value> = params
                .iter()
                .filter(|(k, _)| *k != "main" && *k != "compress")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            compress.insert("rope_theta".into(), compress_theta_default.into());
            let yarn = compress.get("rope_type").and_then(Value::as_str) == Some("yarn");
            if yarn && !compress.contains_key("attention_factor") {
                compress.insert("attention_factor".into(), 1.0.into());
            }
            let mut main = Map::new();
            main.insert("rope_theta".into(), main_theta_default.into());
            (main, compress)
        }
    };
    let main_rope = RopeScaling::parse(&main, max_pos)?;
    let compress_rope = RopeScaling::parse(&compress, max_pos)?;

    let v4 = V4Config {
        q_lora_rank: match &raw.q_lora_rank {
            None => 1024,
            Some(v) => v.as_u64().ok_or_else(|| format!("field `q_lora_rank`: expected an integer, got {v}"))? as usize,
        },
        o_groups: r.o_groups.unwrap_or(8),
        o_lora_rank: r.o_lora_rank.unwrap_or(1024),
        layers: kinds[..layers].to_vec(),
        window: raw.sliding_window.unwrap_or(128),
        index_heads: r.index_n_heads.unwrap_or(64),
        index_head_dim: r.index_head_dim.unwrap_or(128),
        index_topk: r.index_topk.unwrap_or(512),
        compress_rope,
        compress_rope_theta: theta(&compress, compress_theta_default)?,
        hc: HcConfig {
            streams: r.hc_mult.unwrap_or(4),
            sinkhorn_iters: r.hc_sinkhorn_iters.unwrap_or(20),
            eps: r.hc_eps.unwrap_or(1e-6) as f32,
        },
        hash_layers: hash_layers[..layers].to_vec(),
    };
    let heads = raw.num_attention_heads;
    if v4.o_groups == 0 || !heads.is_multiple_of(v4.o_groups) {
        return Err(format!("field `o_groups` ({}) must divide `num_attention_heads` ({heads})", v4.o_groups));
    }
    if v4.hc.streams == 0 || v4.hc.sinkhorn_iters == 0 {
        return Err("fields `hc_mult` and `hc_sinkhorn_iters` must be at least 1".into());
    }
    if !v4.index_head_dim.is_multiple_of(2) || v4.index_head_dim < rot_dim {
        return Err(format!(
            "field `index_head_dim` ({}) must be even and hold the rotary dim {rot_dim}",
            v4.index_head_dim
        ));
    }
    let main_theta = theta(&main, main_theta_default)?;
    Ok((v4, head_dim, main_rope, main_theta, rot_dim))
}

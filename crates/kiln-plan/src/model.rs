//! A model's shape as the planner needs it, computed from its Hugging Face `config.json`:
//! parameters by kind, the FLOPs of a token, what backward keeps per token, and the KV cache
//! per token. Supported: the llama family (`llama`, `mistral`, `qwen2`, `qwen3`),
//! `deepseek_v3` (MLA + MoE) and `deepseek_v4` (grouped low-rank output, compressed sparse
//! attention, hyper-connections, MoE in every layer).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Parameters by kind, for the whole model or one group of layers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ParamCounts {
    pub embedding: f64,
    pub lm_head: f64,
    pub attention: f64,
    pub dense_mlp: f64,
    pub shared_experts: f64,
    pub routed_experts: f64,
    pub router: f64,
    /// Norms, hyper-connection mixers, attention sinks, MTP projections.
    pub other: f64,
}

impl ParamCounts {
    pub fn total(&self) -> f64 {
        self.non_expert() + self.routed_experts
    }

    /// Everything but the routed experts: what every data-parallel replica holds whole.
    pub fn non_expert(&self) -> f64 {
        self.embedding + self.lm_head + self.attention + self.dense_mlp + self.shared_experts + self.router + self.other
    }
}

/// How attention reaches back, for its FLOPs.
#[derive(Clone, Debug, PartialEq)]
pub enum Reach {
    /// Causal over the whole sequence, or a sliding window.
    Full { window: Option<f64> },
    /// DeepSeek-V4: per layer its kind of attention, always with a sliding window.
    Compressed { layers: Vec<V4Attention>, window: f64, topk: f64, index_dim: f64 },
}

/// A DeepSeek-V4 layer's attention (transformers' `layer_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Attention {
    /// The sliding window only.
    Sliding,
    /// Compressed sparse attention: entries pooled at this rate over overlapping windows, of
    /// which an indexer picks the top `topk` per query.
    Sparse(usize),
    /// Heavily compressed attention: entries pooled at this rate, all attended.
    Heavy(usize),
}

impl V4Attention {
    /// The compression rate (0 for the window alone).
    pub fn rate(self) -> usize {
        match self {
            V4Attention::Sliding => 0,
            V4Attention::Sparse(r) | V4Attention::Heavy(r) => r,
        }
    }
}

/// Routed experts.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeShape {
    /// Layers with experts (MTP excluded).
    pub layers: usize,
    pub experts: usize,
    /// Experts per token.
    pub active: usize,
    pub shared: usize,
    pub expert_params: f64,
    pub expert_inter: f64,
    /// Node-limited routing: a token's experts sit in at most this many groups (DeepSeek-V3's
    /// `topk_group`), so at most this many copies of it cross the network.
    pub max_groups: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub model_type: String,
    pub vocab: f64,
    pub hidden: f64,
    pub layers: usize,
    pub heads: usize,
    /// The main model's parameters (MTP layers excluded, as published totals count them).
    pub params: ParamCounts,
    /// Multi-token-prediction layers' parameters (they share the embedding and head).
    pub mtp: ParamCounts,
    pub moe: Option<MoeShape>,
    /// Parameters read per token by matrix products (embedding lookups excluded), main model.
    pub matmul_active: f64,
    /// Parameters active per token (embedding included), as published "active" counts.
    pub active: f64,
    /// Attention widths: query/key (H·d_qk) and value (H·d_v) summed over heads.
    pub qk_width: f64,
    pub v_width: f64,
    pub reach: Reach,
    /// Parameters per layer recomputed under selective recomputation (MLA up-projections).
    pub up_projection: f64,
    /// Bytes backward keeps per token per layer, by recomputation mode.
    pub saved_none: f64,
    pub saved_selective: f64,
    /// KV-cache bytes per token per layer (bf16; MLA caches its latent).
    pub kv_bytes: f64,
    /// Bytes of one token's residual stream (a layer's input), kept per layer under full
    /// recomputation and sent between pipeline stages.
    pub residual_bytes: f64,
    /// Of `saved_none` and `saved_selective`, the bytes of residual-stream-sized tensors (a
    /// layer's input, the residual after attention, the norms' inputs and outputs), which
    /// sequence parallel cuts by tokens and plain tensor parallel keeps whole on every rank.
    pub stream_saved: (f64, f64),
    /// The largest weight matrix (elements), for Muon's per-matrix orthogonalisation.
    pub largest_matrix: f64,
    /// Parameters per layer (on average) that tensor parallel keeps whole on every rank: the
    /// norms, and MLA's down-projections and the routers (kiln and Megatron-LM alike).
    pub tp_whole: f64,
}

/// `config.json` fields with errors that name the file and the field.
struct Fields<'a> {
    v: &'a Value,
    file: String,
}

impl Fields<'_> {
    fn opt(&self, key: &str) -> Option<f64> {
        self.v.get(key).and_then(Value::as_f64)
    }

    fn num(&self, key: &str) -> Result<f64> {
        match self.v.get(key) {
            Some(x) => x.as_f64().with_context(|| format!("{}: field `{key}` is `{x}`, not a number", self.file)),
            None => bail!("{}: field `{key}` is missing", self.file),
        }
    }

    fn or(&self, key: &str, default: f64) -> f64 {
        self.opt(key).unwrap_or(default)
    }

    fn flag(&self, key: &str) -> bool {
        self.v.get(key).and_then(Value::as_bool).unwrap_or(false)
    }
}

/// Bytes per element.
const BF16: f64 = 2.0;
const F32: f64 = 4.0;
const FP8: f64 = 1.0;

impl ModelShape {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        Self::parse(&v, &path.display().to_string())
    }

    pub fn parse(v: &Value, file: &str) -> Result<Self> {
        let f = Fields { v, file: file.to_string() };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" => llama(&f, model_type),
            "deepseek_v3" => deepseek_v3(&f),
            "deepseek_v4" => deepseek_v4(&f),
            "" => bail!("{file}: field `model_type` is missing"),
            other => bail!(
                "{file}: model_type `{other}` is not one kiln plan knows (llama, mistral, qwen2, qwen3, deepseek_v3, deepseek_v4)"
            ),
        }
    }

    /// Forward FLOPs per token of attention scores and weighted sums at sequence length
    /// `seq` (causal: a token sees half the sequence on average), summed over layers.
    pub fn attention_flops(&self, seq: f64) -> f64 {
        let per_key = 2.0 * (self.qk_width + self.v_width);
        match &self.reach {
            Reach::Full { window } => {
                let context = window.map_or(seq / 2.0, |w| w.min(seq / 2.0));
                self.layers as f64 * per_key * context
            }
            Reach::Compressed { layers, window, topk, index_dim } => layers
                .iter()
                .take(self.layers)
                .map(|&kind| {
                    let local = window.min(seq / 2.0);
                    let compressed = if kind.rate() == 0 { 0.0 } else { seq / 2.0 / kind.rate() as f64 };
                    match kind {
                        // Sparse: the indexer scores every compressed entry, attention reads top-k.
                        V4Attention::Sparse(_) => {
                            per_key * (local + compressed.min(*topk)) + 2.0 * index_dim * compressed
                        }
                        _ => per_key * (local + compressed),
                    }
                })
                .sum(),
        }
    }

    /// Training FLOPs per token (forward and backward: 3 forwards' worth).
    pub fn train_flops(&self, seq: f64) -> f64 {
        3.0 * self.forward_flops(seq)
    }

    pub fn forward_flops(&self, seq: f64) -> f64 {
        2.0 * self.matmul_active + self.attention_flops(seq)
    }
}

fn llama(f: &Fields, model_type: String) -> Result<ModelShape> {
    let (h, vocab, layers) = (f.num("hidden_size")?, f.num("vocab_size")?, f.num("num_hidden_layers")? as usize);
    let heads = f.num("num_attention_heads")?;
    let kv = f.or("num_key_value_heads", heads);
    let d = f.opt("head_dim").unwrap_or(h / heads);
    let inter = f.num("intermediate_size")?;
    let bias = f.flag("attention_bias") || model_type == "qwen2";
    let attn = h * heads * d + 2.0 * h * kv * d + heads * d * h + if bias { heads * d + 2.0 * kv * d } else { 0.0 };
    let qk_norm = if model_type == "qwen3" { 2.0 * d } else { 0.0 };
    let mlp = 3.0 * h * inter;
    let l = layers as f64;
    let tied = f.flag("tie_word_embeddings");
    let params = ParamCounts {
        embedding: vocab * h,
        lm_head: if tied { 0.0 } else { vocab * h },
        attention: l * attn,
        dense_mlp: l * mlp,
        other: l * (2.0 * h + qk_norm) + h,
        ..Default::default()
    };
    let matmul_active = l * (attn + mlp) + vocab * h;
    // Saved per token per layer: inputs of both blocks; with `none` also both norm outputs and
    // the SwiGLU product; q, k, v, the attention output and its log-sum-exp in every mode
    // (flash attention recomputes the scores anyway).
    let attention_saved = BF16 * (heads * d + 2.0 * kv * d + heads * d) + F32 * heads;
    let saved_selective = BF16 * (2.0 * h + 2.0 * inter) + attention_saved;
    Ok(ModelShape {
        model_type,
        vocab,
        hidden: h,
        layers,
        heads: heads as usize,
        active: params.total(),
        params,
        mtp: ParamCounts::default(),
        moe: None,
        matmul_active,
        qk_width: heads * d,
        v_width: heads * d,
        reach: Reach::Full { window: f.opt("sliding_window") },
        up_projection: 0.0,
        saved_none: saved_selective + BF16 * (2.0 * h + inter),
        saved_selective,
        kv_bytes: BF16 * 2.0 * kv * d,
        residual_bytes: BF16 * h,
        stream_saved: (BF16 * 4.0 * h, BF16 * 2.0 * h),
        largest_matrix: (h * inter).max(vocab * h),
        tp_whole: 2.0 * h,
    })
}

/// What an MoE layer keeps per token: routed copies of the input (fp8 under selective
/// recomputation, as DeepSeek-V3 caches them) with their gate and up projections (plus the
/// SwiGLU product without recomputation), the same for shared experts, and router scores.
fn moe_saved(h: f64, inter: f64, active: f64, shared: f64, experts: f64) -> (f64, f64) {
    let selective = active * (FP8 * h + BF16 * 2.0 * inter) + shared * BF16 * 2.0 * inter + F32 * experts;
    let none = active * (BF16 * h + BF16 * 3.0 * inter) + shared * BF16 * 3.0 * inter + F32 * experts;
    (none, selective)
}

fn deepseek_v3(f: &Fields) -> Result<ModelShape> {
    let (h, vocab, layers) = (f.num("hidden_size")?, f.num("vocab_size")?, f.num("num_hidden_layers")? as usize);
    let heads = f.num("num_attention_heads")?;
    let (nope, rope, vd) = (f.num("qk_nope_head_dim")?, f.num("qk_rope_head_dim")?, f.num("v_head_dim")?);
    let kv_lora = f.num("kv_lora_rank")?;
    let q_lora = f.opt("q_lora_rank");
    let dq = nope + rope;
    let q_params = match q_lora {
        Some(r) => h * r + r + r * heads * dq,
        None => h * heads * dq,
    };
    let up_projection = q_lora.map_or(0.0, |r| r * heads * dq) + kv_lora * heads * (nope + vd);
    let attn = q_params + h * (kv_lora + rope) + kv_lora + kv_lora * heads * (nope + vd) + heads * vd * h;
    let dense_layers = (f.or("first_k_dense_replace", 0.0) as usize).min(layers);
    let moe_layers = layers - dense_layers;
    let inter = f.num("intermediate_size")?;
    let experts = f.num("n_routed_experts")?;
    let (active, shared) = (f.num("num_experts_per_tok")?, f.or("n_shared_experts", 0.0));
    let expert_inter = f.num("moe_intermediate_size")?;
    let expert = 3.0 * h * expert_inter;
    let router = h * experts + experts; // gate and its correction bias
    let l = layers as f64;
    let ml = moe_layers as f64;
    let params = ParamCounts {
        embedding: vocab * h,
        lm_head: if f.flag("tie_word_embeddings") { 0.0 } else { vocab * h },
        attention: l * attn,
        dense_mlp: dense_layers as f64 * 3.0 * h * inter,
        shared_experts: ml * shared * expert,
        routed_experts: ml * experts * expert,
        router: ml * router,
        other: l * (2.0 * h) + h,
    };
    // An MTP layer: a full MoE layer, its input projection and three norms.
    let mtp_layers = f.or("num_nextn_predict_layers", 0.0);
    let mtp = ParamCounts {
        attention: mtp_layers * attn,
        shared_experts: mtp_layers * shared * expert,
        routed_experts: mtp_layers * experts * expert,
        router: mtp_layers * router,
        other: mtp_layers * (2.0 * h * h + 5.0 * h),
        ..Default::default()
    };
    let matmul_active = l * attn + params.dense_mlp + ml * ((active + shared) * expert + h * experts) + vocab * h;
    let attention_saved_selective = BF16 * (q_lora.unwrap_or(0.0) + kv_lora + rope + heads * vd) + F32 * heads;
    let attention_saved_none = attention_saved_selective + BF16 * (2.0 * heads * dq + heads * vd);
    let (moe_none, moe_selective) = moe_saved(h, expert_inter, active, shared, experts);
    let dense_share = dense_layers as f64 / l;
    let ffn = |dense: f64, moe: f64| dense_share * dense + (1.0 - dense_share) * moe;
    let saved_selective = BF16 * 2.0 * h + attention_saved_selective + ffn(BF16 * 2.0 * inter, moe_selective);
    let saved_none = BF16 * 4.0 * h + attention_saved_none + ffn(BF16 * 3.0 * inter, moe_none);
    Ok(ModelShape {
        model_type: "deepseek_v3".into(),
        vocab,
        hidden: h,
        layers,
        heads: heads as usize,
        active: params.non_expert() + ml * active * expert,
        params,
        mtp,
        moe: Some(MoeShape {
            layers: moe_layers,
            experts: experts as usize,
            active: active as usize,
            shared: shared as usize,
            expert_params: expert,
            expert_inter,
            max_groups: f.opt("topk_group").map(|g| g as usize),
        }),
        matmul_active,
        qk_width: heads * dq,
        v_width: heads * vd,
        reach: Reach::Full { window: None },
        up_projection,
        saved_none,
        saved_selective,
        kv_bytes: BF16 * (kv_lora + rope),
        residual_bytes: BF16 * h,
        stream_saved: (BF16 * 4.0 * h, BF16 * 2.0 * h),
        largest_matrix: (vocab * h).max(heads * vd * h),
        tp_whole: q_lora.map_or(0.0, |r| h * r + r) + h * (kv_lora + rope) + kv_lora + 2.0 * h + ml * router / l,
    })
}

/// Each layer's attention (and the MTP layers' after them, where given): from transformers'
/// `layer_types` with `compress_rates`, or from DeepSeek's own `compress_ratios` (0: sliding
/// window; 4: compressed sparse; other: heavily compressed).
fn v4_layer_kinds(f: &Fields, layers: usize) -> Result<Vec<V4Attention>> {
    let kinds: Vec<V4Attention> = match (f.v.get("layer_types"), f.v.get("compress_ratios")) {
        (Some(Value::Array(types)), _) => {
            let rate = |kind: &str| -> Result<usize> {
                let rate = f.v.get("compress_rates").and_then(|r| r.get(kind)).and_then(Value::as_u64);
                rate.map(|r| r as usize)
                    .with_context(|| format!("{}: field `compress_rates` has no rate for `{kind}`", f.file))
            };
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(V4Attention::Sliding),
                    Some(kind @ "compressed_sparse_attention") => Ok(V4Attention::Sparse(rate(kind)?)),
                    Some(kind @ "heavily_compressed_attention") => Ok(V4Attention::Heavy(rate(kind)?)),
                    _ => bail!(
                        "{}: field `layer_types` has `{t}`, not one of sliding_attention, \
                                compressed_sparse_attention, heavily_compressed_attention",
                        f.file
                    ),
                })
                .collect::<Result<_>>()?
        }
        (_, Some(Value::Array(ratios))) => ratios
            .iter()
            .map(|x| match x.as_u64().unwrap_or(0) as usize {
                0 => V4Attention::Sliding,
                4 => V4Attention::Sparse(4),
                r => V4Attention::Heavy(r),
            })
            .collect(),
        _ => bail!("{}: neither `layer_types` (transformers) nor `compress_ratios` (DeepSeek) is given", f.file),
    };
    if kinds.len() < layers {
        bail!("{}: {} attention types for {layers} layers", f.file, kinds.len());
    }
    Ok(kinds)
}

fn deepseek_v4(f: &Fields) -> Result<ModelShape> {
    let (h, vocab, layers) = (f.num("hidden_size")?, f.num("vocab_size")?, f.num("num_hidden_layers")? as usize);
    let heads = f.num("num_attention_heads")?;
    let hd = f.num("head_dim")?;
    let q_lora = f.num("q_lora_rank")?;
    let (o_groups, o_lora) = (f.num("o_groups")?, f.num("o_lora_rank")?);
    let (index_heads, index_dim) = (f.num("index_n_heads")?, f.num("index_head_dim")?);
    let hc = f.or("hc_mult", 1.0);
    let kinds = v4_layer_kinds(f, layers)?;
    // Attention: low-rank query, one shared key/value head, grouped low-rank output, sinks.
    let core = h * q_lora
        + q_lora
        + q_lora * heads * hd
        + h * hd
        + hd
        + o_groups * (heads / o_groups * hd) * o_lora
        + o_groups * o_lora * h
        + heads;
    // Per compressed layer of rate r: a compressor (gated pooling: key/value and gate
    // projections, a position bias per pooled slot, a norm), over overlapping windows (twice
    // as wide) for sparse attention, whose indexer has a compressor of its own, a query
    // projection from the low-rank query and a per-head weighting of its scores.
    let compressor =
        |r: usize, width: f64, overlap: f64| 2.0 * h * overlap * width + r as f64 * overlap * width + width;
    let extra = |kind: V4Attention| match kind {
        V4Attention::Sliding => 0.0,
        V4Attention::Sparse(r) => {
            compressor(r, hd, 2.0) + q_lora * index_heads * index_dim + h * index_heads + compressor(r, index_dim, 2.0)
        }
        V4Attention::Heavy(r) => compressor(r, hd, 1.0),
    };
    let main = &kinds[..layers];
    let attn_total: f64 = main.iter().map(|&k| core + extra(k)).sum();
    let experts = f.num("n_routed_experts")?;
    // One shared expert whatever `n_shared_experts` says (transformers' DeepseekV4MoE).
    let (active, shared) = (f.num("num_experts_per_tok")?, 1.0);
    let expert_inter = f.num("moe_intermediate_size")?;
    let expert = 3.0 * h * expert_inter;
    // The routing weights (the correction bias moves by load balancing, not by gradients:
    // transformers keeps it, and hash layers' token table, as buffers).
    let router = h * experts;
    // Hyper-connections: per sub-block (attention, MoE) a mixer from hc·h to (2 + hc)·hc
    // coefficients with their bias and 3 scales; at the top a head from hc·h to hc.
    let mixer = 2.0 * ((hc * h) * (2.0 + hc) * hc + (2.0 + hc) * hc + 3.0);
    let hc_head = (hc * h) * hc + hc + 1.0;
    let l = layers as f64;
    let params = ParamCounts {
        embedding: vocab * h,
        lm_head: if f.flag("tie_word_embeddings") { 0.0 } else { vocab * h },
        attention: attn_total,
        shared_experts: l * shared * expert,
        routed_experts: l * experts * expert,
        router: l * router,
        other: l * (2.0 * h + mixer) + h + hc_head,
        ..Default::default()
    };
    let mtp_layers = f.or("num_nextn_predict_layers", 0.0);
    let mtp_kind = kinds.get(layers).copied().unwrap_or(V4Attention::Sliding);
    let mtp = ParamCounts {
        attention: mtp_layers * (core + extra(mtp_kind)),
        shared_experts: mtp_layers * shared * expert,
        routed_experts: mtp_layers * experts * expert,
        router: mtp_layers * router,
        other: mtp_layers * (2.0 * h * h + 5.0 * h + mixer),
        ..Default::default()
    };
    let matmul_active = attn_total + l * ((active + shared) * expert + router) + vocab * h;
    let compressed_share = main.iter().filter(|&&k| k != V4Attention::Sliding).count() as f64 / l;
    let attention_saved_selective =
        BF16 * (q_lora + hd + heads * hd + o_groups * o_lora) + F32 * heads + compressed_share * BF16 * hd;
    let attention_saved_none = attention_saved_selective + BF16 * heads * hd;
    let (moe_none, moe_selective) = moe_saved(h, expert_inter, active, shared, experts);
    // The residual stream is hc copies wide.
    let residual = BF16 * 2.0 * hc * h;
    let kv_bytes = main.iter().map(|&k| if k.rate() == 0 { 0.0 } else { BF16 * hd / k.rate() as f64 }).sum::<f64>() / l;
    Ok(ModelShape {
        model_type: "deepseek_v4".into(),
        vocab,
        hidden: h,
        layers,
        heads: heads as usize,
        active: params.non_expert() + l * active * expert,
        params,
        mtp,
        moe: Some(MoeShape {
            layers,
            experts: experts as usize,
            active: active as usize,
            shared: shared as usize,
            expert_params: expert,
            expert_inter,
            max_groups: None,
        }),
        matmul_active,
        qk_width: heads * hd,
        v_width: heads * hd,
        reach: Reach::Compressed {
            layers: kinds.clone(),
            window: f.or("sliding_window", 128.0),
            topk: f.or("index_topk", 512.0),
            index_dim: index_heads * index_dim,
        },
        up_projection: q_lora * heads * hd,
        saved_none: residual + BF16 * 2.0 * h + attention_saved_none + moe_none,
        saved_selective: residual + attention_saved_selective + moe_selective,
        kv_bytes,
        residual_bytes: residual / 2.0,
        stream_saved: (residual + BF16 * 2.0 * h, residual),
        largest_matrix: (vocab * h).max(q_lora * heads * hd),
        // Whole under tensor parallel: q_a, the key/value head and their norms, the
        // compressors and indexers, the routers, norms and hyper-connection mixers.
        tp_whole: h * q_lora
            + q_lora
            + h * hd
            + hd
            + main.iter().map(|&k| extra(k)).sum::<f64>() / l
            + router
            + 2.0 * h
            + mixer,
    })
}

//! The parameter tensors of a model: one struct per block kind, their Hugging Face names and
//! shapes (`layout`), and the whole model's tensors in a fixed order shared by parameters,
//! gradients and optimiser moments.

use crate::config::{AttentionKind, Config};

pub mod v4_layout;

/// Declares a struct of tensors (required fields, then optional ones) with `map`, `refs` and
/// `refs_mut`, which visit the fields in declaration order.
macro_rules! tensor_group {
    ($(#[$doc:meta])* $name:ident { $($(#[$rdoc:meta])* $req:ident),* $(,)? }
        optional { $($(#[$odoc:meta])* $opt:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name<T> {
            $($(#[$rdoc])* pub $req: T,)*
            $($(#[$odoc])* pub $opt: Option<T>,)*
        }

        impl<T> $name<T> {
            pub fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> $name<U> {
                $name { $($req: f(&self.$req),)* $($opt: self.$opt.as_ref().map(&mut *f),)* }
            }
            pub fn map_mut<'a, U>(&'a mut self, f: &mut impl FnMut(&'a mut T) -> U) -> $name<U> {
                $name { $($req: f(&mut self.$req),)* $($opt: self.$opt.as_mut().map(&mut *f),)* }
            }
            #[allow(unused_mut)]
            pub fn refs(&self) -> Vec<&T> {
                let mut v: Vec<&T> = vec![$(&self.$req),*];
                $(v.extend(self.$opt.as_ref());)*
                v
            }
            #[allow(unused_mut)]
            pub fn refs_mut(&mut self) -> Vec<&mut T> {
                let mut v: Vec<&mut T> = vec![$(&mut self.$req),*];
                $(v.extend(self.$opt.as_mut());)*
                v
            }
        }
    };
}

tensor_group! {
    /// Grouped-query attention (Llama family).
    GqaWeights { q, k, v, o }
    optional {
        q_bias, k_bias, v_bias, o_bias,
        /// Per-head RMSNorm of q and k before RoPE (Qwen3).
        q_norm, k_norm,
    }
}

tensor_group! {
    /// Multi-head latent attention (DeepSeek-V2/V3).
    MlaWeights {
        /// `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent c_kv and the shared k_pe.
        kv_a,
        kv_a_norm,
        /// `[heads · (qk_nope_head_dim + v_head_dim), kv_lora_rank]`.
        kv_b,
        o,
    }
    optional {
        /// Plain query projection, when `q_lora_rank` is null.
        q,
        /// Low-rank query: `q_b · RMSNorm(q_a · x)`.
        q_a, q_a_norm, q_b,
        q_a_bias, kv_a_bias, o_bias,
    }
}

tensor_group! {
    /// A dense SwiGLU MLP.
    MlpWeights { gate, up, down }
    optional { gate_bias, up_bias, down_bias }
}

tensor_group! {
    /// A DeepSeekMoE layer (see `moe`).
    MoeWeights {
        /// `[experts, hidden]`.
        router,
        /// `[experts, expert_ff, hidden]` each.
        gate, up,
        /// `[experts, hidden, expert_ff]`.
        down,
    }
    optional {
        /// `[experts]`, the aux-loss-free balancing bias: selection only, never trained by
        /// gradient. None where a frozen table routes (V4's hash layers).
        bias,
        /// The shared experts as one MLP of width `n_shared_experts · expert_ff`.
        shared_gate, shared_up, shared_down,
    }
}

tensor_group! {
    /// DeepSeek-V4 attention (see `layers::v4_attention`).
    V4AttnWeights {
        /// `[q_lora_rank, hidden]` (`wq_a`), its norm (`q_norm`), `[heads·head_dim,
        /// q_lora_rank]` (`wq_b`).
        q_a, q_a_norm, q_b,
        /// `[head_dim, hidden]` (`wkv`): the one head that is both key and value, and its norm.
        kv, kv_norm,
        /// `[o_groups·o_lora_rank, heads·head_dim / o_groups]` (`wo_a`, one block per group)
        /// and `[hidden, o_groups·o_lora_rank]` (`wo_b`).
        o_a, o_b,
        /// `[heads]` (`attn_sink`): each head's logit of attending nothing.
        sinks,
    }
    optional {
        /// The compressor of CSA and HCA layers: kv and gate `[c·head_dim, hidden]` (c = 2 for
        /// CSA's overlapping windows, else 1), position bias `[rate, c·head_dim]` (`ape`),
        /// norm `[head_dim]`.
        comp_kv, comp_gate, comp_ape, comp_norm,
        /// CSA's lightning indexer: a compressor of its own at `index_head_dim`, its query
        /// projection `[index_heads·index_head_dim, q_lora_rank]` and head weights
        /// `[index_heads, hidden]`.
        index_kv, index_gate, index_ape, index_norm, index_q_b, index_weights,
    }
}

tensor_group! {
    /// A hyper-connection (DeepSeek-V4): the projection `fn` of the flattened streams to the
    /// mixing weights (`[(2 + n)·n, n·hidden]`, or `[n, n·hidden]` for the head), their biases
    /// and scales.
    HcWeights { mix, base, scale }
    optional {}
}

/// The attention block of a layer.
#[derive(Clone, Debug)]
pub enum AttnWeights<T> {
    Gqa(GqaWeights<T>),
    Mla(MlaWeights<T>),
    V4(V4AttnWeights<T>),
}

/// The feed-forward block of a layer.
#[derive(Clone, Debug)]
pub enum FfnWeights<T> {
    Dense(MlpWeights<T>),
    Moe(MoeWeights<T>),
}

/// One decoder layer: pre-norm attention and pre-norm feed-forward, both residual; with
/// hyper-connections (DeepSeek-V4) each block reads and writes the streams through its own.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    pub input_norm: T,
    pub attn: AttnWeights<T>,
    pub post_norm: T,
    pub ffn: FfnWeights<T>,
    pub hc_attn: Option<HcWeights<T>>,
    pub hc_ffn: Option<HcWeights<T>>,
}

impl<T> LayerWeights<T> {
    pub fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> LayerWeights<U> {
        LayerWeights {
            input_norm: f(&self.input_norm),
            attn: match &self.attn {
                AttnWeights::Gqa(w) => AttnWeights::Gqa(w.map(f)),
                AttnWeights::Mla(w) => AttnWeights::Mla(w.map(f)),
                AttnWeights::V4(w) => AttnWeights::V4(w.map(f)),
            },
            post_norm: f(&self.post_norm),
            ffn: match &self.ffn {
                FfnWeights::Dense(w) => FfnWeights::Dense(w.map(f)),
                FfnWeights::Moe(w) => FfnWeights::Moe(w.map(f)),
            },
            hc_attn: self.hc_attn.as_ref().map(|w| w.map(f)),
            hc_ffn: self.hc_ffn.as_ref().map(|w| w.map(f)),
        }
    }
    /// Every tensor of the layer, in `Weights::iter` order.
    pub fn refs(&self) -> Vec<&T> {
        let mut v = vec![&self.input_norm];
        v.extend(match &self.attn {
            AttnWeights::Gqa(w) => w.refs(),
            AttnWeights::Mla(w) => w.refs(),
            AttnWeights::V4(w) => w.refs(),
        });
        v.push(&self.post_norm);
        v.extend(match &self.ffn {
            FfnWeights::Dense(w) => w.refs(),
            FfnWeights::Moe(w) => w.refs(),
        });
        self.hc_attn.iter().chain(&self.hc_ffn).for_each(|w| v.extend(w.refs()));
        v
    }
    fn refs_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.input_norm];
        v.extend(match &mut self.attn {
            AttnWeights::Gqa(w) => w.refs_mut(),
            AttnWeights::Mla(w) => w.refs_mut(),
            AttnWeights::V4(w) => w.refs_mut(),
        });
        v.push(&mut self.post_norm);
        v.extend(match &mut self.ffn {
            FfnWeights::Dense(w) => w.refs_mut(),
            FfnWeights::Moe(w) => w.refs_mut(),
        });
        self.hc_attn.iter_mut().chain(&mut self.hc_ffn).for_each(|w| v.extend(w.refs_mut()));
        v
    }
}

/// The whole model's tensors; `lm_head` is `None` when tied to `embed` or when the model
/// scores sequences instead (`score`, `[num_labels, hidden]`, of a
/// `...ForSequenceClassification` model such as a reward model).
#[derive(Clone, Debug)]
pub struct Weights<T> {
    pub embed: T,
    pub layers: Vec<LayerWeights<T>>,
    pub norm: T,
    pub lm_head: Option<T>,
    pub score: Option<T>,
    /// DeepSeek-V4's collapse of the streams before the final norm.
    pub hc_head: Option<HcWeights<T>>,
}

impl<T> Weights<T> {
    pub fn map<'a, U>(&'a self, mut f: impl FnMut(&'a T) -> U) -> Weights<U> {
        Weights {
            embed: f(&self.embed),
            layers: self.layers.iter().map(|l| l.map(&mut f)).collect(),
            norm: f(&self.norm),
            lm_head: self.lm_head.as_ref().map(&mut f),
            score: self.score.as_ref().map(&mut f),
            hc_head: self.hc_head.as_ref().map(|w| w.map(&mut f)),
        }
    }
    /// Every tensor, in a fixed order shared by all `Weights` of the same config.
    pub fn iter(&self) -> Vec<&T> {
        let mut v = vec![&self.embed];
        self.layers.iter().for_each(|l| v.extend(l.refs()));
        v.push(&self.norm);
        v.extend(self.lm_head.as_ref());
        v.extend(self.score.as_ref());
        self.hc_head.iter().for_each(|w| v.extend(w.refs()));
        v
    }
    pub fn iter_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.embed];
        self.layers.iter_mut().for_each(|l| v.extend(l.refs_mut()));
        v.push(&mut self.norm);
        v.extend(self.lm_head.as_mut());
        v.extend(self.score.as_mut());
        self.hc_head.iter_mut().for_each(|w| v.extend(w.refs_mut()));
        v
    }
}

/// How a freshly initialised model fills a tensor (transformers' `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// N(0, initializer_range²): every matrix.
    Normal,
    /// Norm weights.
    Ones,
    /// Biases, including the router's correction bias.
    Zeros,
}

/// A tensor's Hugging Face name and shape, and how it is stored and initialised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// When not empty, the tensor is stored as one tensor per slice along its first
    /// dimension under these names (the per-expert tensors of an MoE layer), and held stacked.
    pub parts: Vec<String>,
    /// Always stored in f32, whatever the checkpoint's dtype (transformers keeps the MoE
    /// router and its correction bias in f32).
    pub keep_f32: bool,
    /// A matrix inside the layers that Muon leaves to AdamW all the same (DeepSeek-V4's
    /// routers); Muon also leaves every tensor kept in f32 (norms, biases, hyper-connections).
    pub adamw_only: bool,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Builds the specs of one layer, `model.layers.{i}.…`.
struct LayerNames(usize);

impl LayerNames {
    fn name(&self, s: &str) -> String {
        format!("model.layers.{}.{s}", self.0)
    }
    fn matrix(&self, s: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: self.name(s),
            shape: shape.to_vec(),
            parts: vec![],
            keep_f32: false,
            adamw_only: false,
            init: Init::Normal,
        }
    }
    fn norm(&self, s: &str, width: usize) -> TensorSpec {
        TensorSpec { init: Init::Ones, ..self.matrix(s, &[width]) }
    }
    fn bias(&self, on: bool, s: &str, width: usize) -> Option<TensorSpec> {
        on.then(|| TensorSpec { init: Init::Zeros, ..self.matrix(s, &[width]) })
    }
    /// `[experts, rows, cols]` stored as `mlp.experts.{e}.{s}`.
    fn experts(&self, s: &str, experts: usize, rows: usize, cols: usize) -> TensorSpec {
        TensorSpec {
            parts: (0..experts).map(|e| self.name(&format!("mlp.experts.{e}.{s}"))).collect(),
            ..self.matrix(&format!("mlp.experts.{s}"), &[experts, rows, cols])
        }
    }
}

fn gqa_layout(cfg: &Config, n: &LayerNames) -> GqaWeights<TensorSpec> {
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    GqaWeights {
        q: n.matrix("self_attn.q_proj.weight", &[q_out, d]),
        k: n.matrix("self_attn.k_proj.weight", &[kv_out, d]),
        v: n.matrix("self_attn.v_proj.weight", &[kv_out, d]),
        o: n.matrix("self_attn.o_proj.weight", &[d, q_out]),
        q_bias: n.bias(cfg.qkv_bias, "self_attn.q_proj.bias", q_out),
        k_bias: n.bias(cfg.qkv_bias, "self_attn.k_proj.bias", kv_out),
        v_bias: n.bias(cfg.qkv_bias, "self_attn.v_proj.bias", kv_out),
        o_bias: n.bias(cfg.o_bias, "self_attn.o_proj.bias", d),
        q_norm: cfg.qk_norm.then(|| n.norm("self_attn.q_norm.weight", hd)),
        k_norm: cfg.qk_norm.then(|| n.norm("self_attn.k_norm.weight", hd)),
    }
}

fn mla_layout(cfg: &Config, m: &crate::config::MlaConfig, n: &LayerNames) -> MlaWeights<TensorSpec> {
    let (d, h) = (cfg.hidden_size, cfg.num_heads);
    let q_out = h * (m.qk_nope_head_dim + m.qk_rope_head_dim);
    let lora = m.q_lora_rank;
    let kv_a_out = m.kv_lora_rank + m.qk_rope_head_dim;
    MlaWeights {
        kv_a: n.matrix("self_attn.kv_a_proj_with_mqa.weight", &[kv_a_out, d]),
        kv_a_norm: n.norm("self_attn.kv_a_layernorm.weight", m.kv_lora_rank),
        kv_b: n.matrix("self_attn.kv_b_proj.weight", &[h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank]),
        o: n.matrix("self_attn.o_proj.weight", &[d, h * m.v_head_dim]),
        q: lora.is_none().then(|| n.matrix("self_attn.q_proj.weight", &[q_out, d])),
        q_a: lora.map(|r| n.matrix("self_attn.q_a_proj.weight", &[r, d])),
        q_a_norm: lora.map(|r| n.norm("self_attn.q_a_layernorm.weight", r)),
        q_b: lora.map(|r| n.matrix("self_attn.q_b_proj.weight", &[q_out, r])),
        q_a_bias: lora.and_then(|r| n.bias(cfg.o_bias, "self_attn.q_a_proj.bias", r)),
        kv_a_bias: n.bias(cfg.o_bias, "self_attn.kv_a_proj_with_mqa.bias", kv_a_out),
        o_bias: n.bias(cfg.o_bias, "self_attn.o_proj.bias", d),
    }
}

fn mlp_layout(cfg: &Config, n: &LayerNames) -> MlpWeights<TensorSpec> {
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    MlpWeights {
        gate: n.matrix("mlp.gate_proj.weight", &[ff, d]),
        up: n.matrix("mlp.up_proj.weight", &[ff, d]),
        down: n.matrix("mlp.down_proj.weight", &[d, ff]),
        gate_bias: n.bias(cfg.mlp_bias, "mlp.gate_proj.bias", ff),
        up_bias: n.bias(cfg.mlp_bias, "mlp.up_proj.bias", ff),
        down_bias: n.bias(cfg.mlp_bias, "mlp.down_proj.bias", d),
    }
}

fn moe_layout(cfg: &Config, m: &crate::config::MoeConfig, n: &LayerNames) -> MoeWeights<TensorSpec> {
    let (d, ff, e, sff) = (cfg.hidden_size, m.expert_ff, m.experts, m.shared_experts * m.expert_ff);
    let shared = |s: &str, shape: &[usize]| (sff > 0).then(|| n.matrix(&format!("mlp.shared_experts.{s}"), shape));
    MoeWeights {
        router: TensorSpec { keep_f32: true, ..n.matrix("mlp.gate.weight", &[e, d]) },
        bias: Some(TensorSpec {
            keep_f32: true,
            init: Init::Zeros,
            ..n.matrix("mlp.gate.e_score_correction_bias", &[e])
        }),
        gate: n.experts("gate_proj.weight", e, ff, d),
        up: n.experts("up_proj.weight", e, ff, d),
        down: n.experts("down_proj.weight", e, d, ff),
        shared_gate: shared("gate_proj.weight", &[sff, d]),
        shared_up: shared("up_proj.weight", &[sff, d]),
        shared_down: shared("down_proj.weight", &[d, sff]),
    }
}

impl Weights<TensorSpec> {
    /// The layout of a rank that holds only the `local` routed experts of every MoE layer.
    pub fn with_experts(mut self, local: std::ops::Range<usize>) -> Self {
        for layer in &mut self.layers {
            if let FfnWeights::Moe(m) = &mut layer.ffn {
                for spec in [&mut m.gate, &mut m.up, &mut m.down] {
                    spec.parts = spec.parts[local.clone()].to_vec();
                    spec.shape[0] = local.len();
                }
            }
        }
        self
    }
}

impl TensorSpec {
    /// Whether this is a stack of routed experts (split over the ranks under expert parallel).
    pub fn is_routed_experts(&self) -> bool {
        !self.parts.is_empty()
    }
}

/// Names and shapes of every parameter for `cfg`.
pub fn layout(cfg: &Config) -> Weights<TensorSpec> {
    if let AttentionKind::V4(v4) = &cfg.attention {
        return v4_layout::layout(cfg, v4);
    }
    let d = cfg.hidden_size;
    let top = |name: &str, shape: &[usize], init| TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        parts: vec![],
        keep_f32: false,
        adamw_only: false,
        init,
    };
    let layers = (0..cfg.num_layers)
        .map(|l| {
            let n = LayerNames(cfg.whole_layer(l));
            LayerWeights {
                input_norm: n.norm("input_layernorm.weight", d),
                attn: match &cfg.attention {
                    AttentionKind::Gqa => AttnWeights::Gqa(gqa_layout(cfg, &n)),
                    AttentionKind::Mla(m) => AttnWeights::Mla(mla_layout(cfg, m, &n)),
                    AttentionKind::V4(_) => unreachable!("deepseek_v4 has its own layout"),
                },
                post_norm: n.norm("post_attention_layernorm.weight", d),
                ffn: match &cfg.moe {
                    Some(m) if cfg.is_moe_layer(l) => FfnWeights::Moe(moe_layout(cfg, m, &n)),
                    _ => FfnWeights::Dense(mlp_layout(cfg, &n)),
                },
                hc_attn: None,
                hc_ffn: None,
            }
        })
        .collect();
    // A pipeline stage lays out what it does not hold with no rows.
    let (embedding, head) = cfg.stage.as_ref().map_or((true, true), |s| (s.embedding, s.head));
    let rows = |n: usize, held: bool| if held { n } else { 0 };
    Weights {
        embed: top("model.embed_tokens.weight", &[rows(cfg.vocab_size, embedding), d], Init::Normal),
        layers,
        norm: top("model.norm.weight", &[rows(d, head)], Init::Ones),
        lm_head: (!cfg.tie_word_embeddings && cfg.num_labels.is_none())
            .then(|| top("lm_head.weight", &[rows(cfg.vocab_size, head), d], Init::Normal)),
        score: cfg.num_labels.map(|labels| top("score.weight", &[rows(labels, head), d], Init::Normal)),
        hc_head: None,
    }
}

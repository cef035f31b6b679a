//! DeepSeek-V4's tensors under the names its checkpoints use (`attn.wq_a`, `ffn.experts.{e}.w1`,
//! `hc_attn_fn`, `head`, …), as transformers writes them (under `model.`, with
//! `model.embed_tokens`, `model.norm` and `model.hc_head.hc_fn`), or as DeepSeek publishes them
//! (`layers.{i}.…`, `embed`, `norm`, `hc_head_fn`: `deepseek_names`). What transformers keeps in
//! f32 in a bf16 model (hyper-connections, sinks, position biases, norms, the correction bias)
//! is stored in f32.

use super::{
    AttnWeights, FfnWeights, HcWeights, Init, LayerNames, LayerWeights, MoeWeights, TensorSpec, V4AttnWeights, Weights,
};
use crate::config::{Config, MoeConfig};
use crate::config_v4::{V4Attention, V4Config};

fn f32_spec(spec: TensorSpec, init: Init) -> TensorSpec {
    TensorSpec { keep_f32: true, init, ..spec }
}

/// A hyper-connection of `outputs` mixing weights over `streams` streams of `d` features.
fn hc(name: impl Fn(&str) -> String, outputs: usize, streams: usize, d: usize, scales: usize) -> HcWeights<TensorSpec> {
    let spec = |suffix: &str, shape: &[usize], init| TensorSpec {
        name: name(suffix),
        shape: shape.to_vec(),
        parts: vec![],
        keep_f32: true,
        adamw_only: false,
        init,
    };
    HcWeights {
        mix: spec("fn", &[outputs, streams * d], Init::Normal),
        base: spec("base", &[outputs], Init::Zeros),
        scale: spec("scale", &[scales], Init::Ones),
    }
}

fn attention(cfg: &Config, v4: &V4Config, kind: V4Attention, n: &LayerNames) -> V4AttnWeights<TensorSpec> {
    let (d, h, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim);
    let (r, g, or) = (v4.q_lora_rank, v4.o_groups, v4.o_lora_rank);
    let (ihd, ih) = (v4.index_head_dim, v4.index_heads);
    // CSA's compressors write two series per token (overlapping windows).
    let series = kind.compression().map_or(1, |k| k.series());
    let rate = kind.rate();
    let compressor = |s: &str| rate.map(|_| n.matrix(&format!("attn.compressor.{s}.weight"), &[series * hd, d]));
    let sparse = matches!(kind, V4Attention::Sparse { .. });
    let index = |s: &str, shape: &[usize]| sparse.then(|| n.matrix(&format!("attn.indexer.{s}"), shape));
    V4AttnWeights {
        q_a: n.matrix("attn.wq_a.weight", &[r, d]),
        q_a_norm: f32_spec(n.norm("attn.q_norm.weight", r), Init::Ones),
        q_b: n.matrix("attn.wq_b.weight", &[h * hd, r]),
        kv: n.matrix("attn.wkv.weight", &[hd, d]),
        kv_norm: f32_spec(n.norm("attn.norm.weight", hd), Init::Ones),
        o_a: n.matrix("attn.wo_a.weight", &[g * or, h * hd / g]),
        o_b: n.matrix("attn.wo_b.weight", &[d, g * or]),
        sinks: f32_spec(n.matrix("attn.attn_sink", &[h]), Init::Zeros),
        comp_kv: compressor("wkv"),
        comp_gate: compressor("wgate"),
        comp_ape: rate.map(|rate| f32_spec(n.matrix("attn.compressor.ape", &[rate, series * hd]), Init::Zeros)),
        comp_norm: rate.map(|_| f32_spec(n.norm("attn.compressor.norm.weight", hd), Init::Ones)),
        index_kv: index("compressor.wkv.weight", &[2 * ihd, d]),
        index_gate: index("compressor.wgate.weight", &[2 * ihd, d]),
        index_ape: rate
            .filter(|_| sparse)
            .map(|rate| f32_spec(n.matrix("attn.indexer.compressor.ape", &[rate, 2 * ihd]), Init::Zeros)),
        index_norm: sparse.then(|| f32_spec(n.norm("attn.indexer.compressor.norm.weight", ihd), Init::Ones)),
        index_q_b: index("wq_b.weight", &[ih * ihd, r]),
        index_weights: index("weights_proj.weight", &[ih, d]),
    }
}

fn moe(cfg: &Config, m: &MoeConfig, hash: bool, n: &LayerNames) -> MoeWeights<TensorSpec> {
    let (d, ff, e) = (cfg.hidden_size, m.expert_ff, m.experts);
    let experts = |s: &str, rows: usize, cols: usize| TensorSpec {
        parts: (0..e).map(|i| n.name(&format!("ffn.experts.{i}.{s}.weight"))).collect(),
        ..n.matrix(&format!("ffn.experts.{s}.weight"), &[e, rows, cols])
    };
    MoeWeights {
        router: TensorSpec { adamw_only: true, ..n.matrix("ffn.gate.weight", &[e, d]) },
        gate: experts("w1", ff, d),
        up: experts("w3", ff, d),
        down: experts("w2", d, ff),
        bias: (!hash).then(|| f32_spec(n.matrix("ffn.gate.bias", &[e]), Init::Zeros)),
        shared_gate: Some(n.matrix("ffn.shared_experts.w1.weight", &[ff, d])),
        shared_up: Some(n.matrix("ffn.shared_experts.w3.weight", &[ff, d])),
        shared_down: Some(n.matrix("ffn.shared_experts.w2.weight", &[d, ff])),
    }
}

/// Names and shapes of every parameter of a `deepseek_v4` config.
pub(super) fn layout(cfg: &Config, v4: &V4Config) -> Weights<TensorSpec> {
    let d = cfg.hidden_size;
    let streams = v4.hc.streams;
    let mixes = (2 + streams) * streams;
    let m = cfg.moe.as_ref().expect("deepseek_v4 has MoE layers");
    // A pipeline stage's layers are named by their place in the whole model, their settings
    // (`v4.layers`, `v4.hash_layers`) the stage's own.
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let n = LayerNames(cfg.whole_layer(i));
            LayerWeights {
                input_norm: f32_spec(n.norm("attn_norm.weight", d), Init::Ones),
                attn: AttnWeights::V4(attention(cfg, v4, v4.layers[i], &n)),
                post_norm: f32_spec(n.norm("ffn_norm.weight", d), Init::Ones),
                ffn: FfnWeights::Moe(moe(cfg, m, v4.hash_layers[i], &n)),
                hc_attn: Some(hc(|s| n.name(&format!("hc_attn_{s}")), mixes, streams, d, 3)),
                hc_ffn: Some(hc(|s| n.name(&format!("hc_ffn_{s}")), mixes, streams, d, 3)),
            }
        })
        .collect();
    let top = |name: &str, shape: &[usize], init| TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        parts: vec![],
        keep_f32: false,
        adamw_only: false,
        init,
    };
    // A pipeline stage lays out what it does not hold with no rows.
    let (embedding, head) = cfg.stage.as_ref().map_or((true, true), |s| (s.embedding, s.head));
    let rows = |n: usize, held: bool| if held { n } else { 0 };
    let mut hc_head = hc(|s| format!("model.hc_head.hc_{s}"), rows(streams, head), streams, d, rows(1, head));
    hc_head.mix.shape[1] = rows(streams * d, head);
    Weights {
        embed: top("model.embed_tokens.weight", &[rows(cfg.vocab_size, embedding), d], Init::Normal),
        layers,
        norm: f32_spec(top("model.norm.weight", &[rows(d, head)], Init::Ones), Init::Ones),
        lm_head: (!cfg.tie_word_embeddings && cfg.num_labels.is_none())
            .then(|| top("head.weight", &[rows(cfg.vocab_size, head), d], Init::Normal)),
        score: cfg.num_labels.map(|labels| top("score.weight", &[rows(labels, head), d], Init::Normal)),
        hc_head: Some(hc_head),
    }
}

/// DeepSeek's published name of a tensor transformers saves as `name`.
pub fn deepseek_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => "embed.weight".into(),
        "model.norm.weight" => "norm.weight".into(),
        _ => match name.strip_prefix("model.hc_head.hc_") {
            Some(part) => format!("hc_head_{part}"),
            None => name.strip_prefix("model.").unwrap_or(name).to_string(),
        },
    }
}

/// `layout` under DeepSeek's published names.
pub fn deepseek_names(layout: &Weights<TensorSpec>) -> Weights<TensorSpec> {
    layout.map(&mut |s: &TensorSpec| TensorSpec {
        name: deepseek_name(&s.name),
        parts: s.parts.iter().map(|p| deepseek_name(p)).collect(),
        ..s.clone()
    })
}

/// Whether a checkpoint holding the tensors `names` uses DeepSeek's published names.
pub fn uses_deepseek_names<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n == "embed.weight")
}

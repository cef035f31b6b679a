//! What the in-process parallel tests share: ranks as threads of this process
//! (`kiln_dist::Threads`), the example runs on them, and their metrics.

#![allow(dead_code)]

mod sweep;

use kiln_core::Cpu;
use kiln_dist::Threads;
use kiln_train::{RunConfig, RunSummary, Runtime};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");

/// Runs `run` on `ranks` ranks of one process, each on a thread of its own.
pub fn on_ranks<S: Send>(ranks: usize, run: impl Fn(Runtime<Cpu>) -> S + Sync) -> Vec<S> {
    let comms = Threads::new(ranks, Duration::from_secs(120));
    std::thread::scope(|s| {
        let handles: Vec<_> =
            comms.into_iter().map(|c| s.spawn(|| run(Runtime { b: Cpu, world: Arc::new(c) }))).collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

pub fn scratch(name: &str) -> PathBuf {
    sweep::sweep_ended_runs("kiln-dp-threads-");
    let dir = std::env::temp_dir().join(format!("kiln-dp-threads-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `examples/RECIPE.toml` into `dir` with `overrides`, in f32 unless they say otherwise: the
/// curves match to f32 noise there (`bf16_gives_the_same_curve_within_its_rounding` for bf16).
pub fn config(recipe: &str, dir: &Path, overrides: &[&str]) -> RunConfig {
    let mut all = vec![format!("output.dir={:?}", dir.display().to_string()), "train.dtype=\"f32\"".into()];
    all.extend(overrides.iter().map(|s| s.to_string()));
    RunConfig::load_resolved(Path::new(&format!("{EXAMPLES}/{recipe}.toml")), &all).expect("example config")
}

/// Runs `recipe` on `ranks` ranks; returns rank 0's summary's step count.
pub fn run(recipe: &str, ranks: usize, dir: &Path, overrides: &[&str], resume: bool) -> u64 {
    let c = config(recipe, dir, overrides);
    let resume = || resume.then_some(kiln_train::Resume::Latest);
    fn steps<S>(r: anyhow::Result<RunSummary<S>>) -> u64 {
        r.unwrap_or_else(|e| panic!("{e:#}")).steps
    }
    let summaries = on_ranks(ranks, |rt| match recipe {
        "sft" => steps(kiln_train::sft::run(rt, &c, resume(), true)),
        "dpo" => steps(kiln_train::dpo::run(rt, &c, resume(), true)),
        "rm" => steps(kiln_train::rm::run(rt, &c, resume(), true)),
        "kto" => steps(kiln_train::kto::run(rt, &c, resume(), true)),
        "grpo" => steps(kiln_train::grpo::run(rt, &c, resume(), true)),
        "distill" => steps(kiln_train::distill::run(rt, &c, resume(), true)),
        other => panic!("no recipe {other}"),
    });
    summaries[0]
}

/// Metrics lines of training steps.
pub fn steps(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["grad_norm"].is_number())
        .collect()
}

/// Every step of run `dir` says where its time went: the wait for the gradients' reduction
/// and the optimizer, each a part of the step's seconds.
pub fn assert_step_times(dir: &Path, what: &str) {
    for step in steps(dir) {
        let n = &step["step"];
        let at = |key: &str| step[key].as_f64().unwrap_or_else(|| panic!("{what}: no `{key}` at step {n}"));
        let (whole, reduce, update) = (at("step_s"), at("grad_reduce_s"), at("optimizer_s"));
        assert!(
            reduce >= 0.0 && update > 0.0 && reduce + update < whole,
            "{what}: step {n} of {whole} s: gradient reduction {reduce} s, optimizer {update} s"
        );
    }
}

pub fn series(dir: &Path, key: &str) -> Vec<f64> {
    steps(dir).iter().map(|v| v[key].as_f64().unwrap()).collect()
}

/// The eval losses (before training and at the end), each rank having scored its share.
pub fn eval_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval_loss"].as_f64())
        .collect()
}

pub fn assert_same_curve(reference: &[f64], curve: &[f64], tolerance: f64, what: &str) {
    assert_eq!(curve.len(), reference.len(), "{what}: one metrics line per step");
    assert!(!reference.is_empty(), "{what}: no steps");
    for (step, (a, b)) in reference.iter().zip(curve).enumerate() {
        assert!((a - b).abs() <= tolerance * a.abs().max(1e-3), "{what} step {}: 1 rank {a}, here {b}", step + 1);
    }
}

pub fn scratch_keep(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-dp-threads-{}-{name}", std::process::id()))
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs `sft` on `ranks` ranks and returns rank 0's error.
pub fn sft_error(ranks: usize, dir: &Path, overrides: &[&str], resume: bool) -> String {
    let c = config("sft", dir, overrides);
    let errors = on_ranks(ranks, |rt| {
        let resume = resume.then_some(kiln_train::Resume::Latest);
        kiln_train::sft::run(rt, &c, resume, true).err().map(|e| format!("{e:#}"))
    });
    errors[0].clone().expect("the run should have failed")
}

/// A 6-step SFT run of the example on `ranks` ranks, 4 micro-batches a step over all of them.
pub fn sft(ranks: usize, dir: &Path, extra: &[&str]) {
    let accum = format!("train.grad_accum={}", 4 / ranks);
    let mut overrides = vec!["train.steps=6", "output.save_every=3", accum.as_str()];
    overrides.extend(extra);
    assert_eq!(run("sft", ranks, dir, &overrides, false), 6);
}

/// A Hugging Face directory `dir` of `model` with config `config` and the demo tokenizer;
/// returns the override that trains it (`model.path=…`).
pub fn write_base(dir: &Path, config: &str, model: &kiln_model::Model<Cpu>) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let demo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base"));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(demo.join(f), dir.join(f)).unwrap();
    }
    model.save_weights(&Cpu, dir).unwrap();
    format!("model.path={:?}", dir.display().to_string())
}

/// `sft` on `ranks` ranks laid out as `layout`, the 4 micro-batches of a step split over its
/// data-parallel ranks (`dp`, 1 unless given); a trailing `,overlap` on `layout` stands for
/// `train.overlap_grad_reduce` (the gradients' reduction started during backward).
pub fn sft_laid_out(ranks: usize, dir: &Path, layout: &str, extra: &[&str]) {
    if let Some(layout) = layout.strip_suffix(",overlap") {
        return sft_laid_out(ranks, dir, layout, &[extra, &["train.overlap_grad_reduce=true"]].concat());
    }
    let dp: usize = layout.split(',').find_map(|p| p.strip_prefix("dp=")).map_or(1, |d| d.parse().unwrap());
    let (layout, accum) = (format!("train.layout={layout:?}"), format!("train.grad_accum={}", 4 / dp));
    sft(ranks, dir, &[extra, &[layout.as_str(), accum.as_str()]].concat());
}

/// The weights of checkpoint `dir`, by name.
pub fn checkpoint_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let config = kiln_model::Config::load(dir).unwrap();
    let layout = kiln_model::weights::layout(&config);
    let spec = kiln_model::safetensors_io::LoadSpec::plain(&layout);
    let loaded = kiln_model::safetensors_io::load(dir, &spec).unwrap();
    layout.iter().into_iter().map(|s| s.name.clone()).zip(loaded.tensors.iter().into_iter().cloned()).collect()
}

/// Every tensor of checkpoints `a` and `b` agrees within 1e-5 of its largest value.
pub fn assert_same_weights(a: &Path, b: &Path, what: &str) {
    assert_close_weights(a, b, 1e-5, what);
}

/// Every tensor of checkpoints `a` and `b` agrees within `tolerance` of its largest value.
pub fn assert_close_weights(a: &Path, b: &Path, tolerance: f32, what: &str) {
    let (name, worst, scale) = weights_deviation(a, b);
    assert!(worst <= tolerance * scale, "{what}: `{name}` differs by {worst} (values up to {scale})");
}

/// The tensor of checkpoints `a` and `b` that differs most for its largest value: its name,
/// the largest difference and that value.
pub fn weights_deviation(a: &Path, b: &Path) -> (String, f32, f32) {
    let mut worst = (String::new(), 0f32, 1f32);
    for ((name, x), (_, y)) in checkpoint_weights(a).iter().zip(checkpoint_weights(b)) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        if diff / scale > worst.1 / worst.2 {
            worst = (name.clone(), diff, scale);
        }
    }
    worst
}

/// A tiny random DeepSeek-V3 with `heads` attention heads (latent attention with a low-rank
/// query; one dense layer, then two MoE layers of 8 routed experts, 2 per token, and a shared
/// expert) with the demo tokenizer, as a Hugging Face directory; returns its `model.path`
/// override.
#[allow(dead_code)]
pub fn deepseek_base(dir: &Path, heads: usize) -> String {
    deepseek_base_of(dir, heads, 3)
}

/// `deepseek_base` with `layers` layers (one dense, the rest MoE).
pub fn deepseek_base_of(dir: &Path, heads: usize, layers: usize) -> String {
    let config = r#"{
        "model_type": "deepseek_v3", "vocab_size": 99, "hidden_size": 48, "intermediate_size": 96,
        "moe_intermediate_size": 24, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
        "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 12, "routed_scaling_factor": 2.5,
        "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 256
    }"#
    .replace("HEADS", &heads.to_string())
    .replace("LAYERS", &layers.to_string());
    write_base(dir, &config, &kiln_model::Model::random(&Cpu, kiln_model::Config::parse(&config).unwrap(), 1))
}

/// A tiny random DeepSeek-V4 (`tests/fixtures/tiny_deepseek_v4.json`: sliding, compressed
/// sparse and heavily compressed attention, a hash-routed MoE layer then two scored ones, two
/// hyper-connected streams) with the demo tokenizer, as a Hugging Face directory; returns its `model.path` override.
pub fn deepseek_v4_base(dir: &Path) -> String {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let config = std::fs::read_to_string(root.join("tests/fixtures/tiny_deepseek_v4.json")).unwrap();
    write_base(dir, &config, &kiln_model::Model::random(&Cpu, kiln_model::Config::parse(&config).unwrap(), 1))
}

/// `deepseek_v4_base` with a fourth layer: compressed sparse attention and a scored MoE.
#[allow(dead_code)]
pub fn deepseek_v4_base_of_4_layers(dir: &Path) -> String {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let fixture = std::fs::read_to_string(root.join("tests/fixtures/tiny_deepseek_v4.json")).unwrap();
    let mut config: Value = serde_json::from_str(&fixture).unwrap();
    config["num_hidden_layers"] = 4.into();
    config["layer_types"].as_array_mut().unwrap().push("compressed_sparse_attention".into());
    config["mlp_layer_types"].as_array_mut().unwrap().push("moe".into());
    let config = config.to_string();
    write_base(dir, &config, &kiln_model::Model::random(&Cpu, kiln_model::Config::parse(&config).unwrap(), 1))
}

/// A DeepSeek-V4 run in `dir` against the one-process run in `one`: the loss and grad-norm
/// curves and the eval losses within 1e-5, the same expert loads, and the final checkpoint
/// within 4e-3 of each tensor's largest value. AdamW's first steps move a weight by about the
/// rate whatever its gradient's size, so the zero-initialised stream mixes, whose gradients are
/// tiny, carry summation-order noise (1.4e-6 under pp 3, 1.8e-6 under plain data parallel on
/// 4 ranks, measured).
pub fn assert_v4_follows(one: &Path, dir: &Path, what: &str) {
    assert_same_curve(&series(one, "loss"), &series(dir, "loss"), 1e-5, what);
    assert_same_curve(&series(one, "grad_norm"), &series(dir, "grad_norm"), 1e-5, what);
    assert_same_curve(&eval_losses(one), &eval_losses(dir), 1e-5, &format!("{what}, eval"));
    assert_eq!(steps(one)[1]["expert_load"], steps(dir)[1]["expert_load"], "{what}: expert loads");
    let last = "checkpoints/step-00000006";
    assert_close_weights(&one.join(last), &dir.join(last), 4e-3, &format!("{what}: the final checkpoint"));
}

/// GRPO on the DeepSeek-V4 `model` (its `model.path` override) on `ranks` ranks laid out as
/// `layout` follows the one-process run (4 steps); `name` names the scratch directories.
pub fn assert_v4_grpo_follows(model: &str, ranks: usize, layout: &str, name: &str) {
    let (a, b) = (scratch(&format!("{name}-grpo-1")), scratch(&format!("{name}-grpo-{layout}")));
    run("grpo", 1, &a, &[model, "train.steps=4"], false);
    run("grpo", ranks, &b, &[model, "train.steps=4", &format!("train.layout={layout:?}")], false);
    assert!(series(&a, "grad_norm").iter().any(|g| *g > 0.0), "deepseek_v4 grpo: no gradient to compare");
    assert_same_curve(&series(&a, "loss"), &series(&b, "loss"), 1e-5, &format!("deepseek_v4 grpo, {layout}"));
    assert_same_curve(&series(&a, "grad_norm"), &series(&b, "grad_norm"), 1e-4, &format!("deepseek_v4 grpo, {layout}"));
}

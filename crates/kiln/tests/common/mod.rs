//! Test models shared by the CLI tests.

#[allow(dead_code)]
#[path = "../../../kiln-train/tests/common/sweep.rs"]
mod sweep;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
#[allow(unused_imports)]
pub use sweep::sweep_ended_runs;

const DEMO_BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");
/// The config of `deepseek_v4_base` (also the data-parallel tests' V4 model).
const TINY_V4: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny_deepseek_v4.json");

/// Runs the kiln binary with `args`.
#[allow(dead_code)]
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

/// An empty directory `name` of this test process under the temp dir.
#[allow(dead_code)]
pub fn scratch_dir(name: &str) -> PathBuf {
    sweep_ended_runs("kiln-test-");
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chat row asking for a sum, answered.
#[allow(dead_code)]
pub fn chat_row(i: usize) -> String {
    let (a, b) = (i * 7 % 50, i * 13 % 40);
    format!(
        r#"{{"messages": [{{"role": "user", "content": "What is {a} plus {b}?"}}, {{"role": "assistant", "content": "{}"}}]}}"#,
        a + b
    )
}

/// The multi-token-prediction tensor `deepseek_base` carries (not trained, written back as read).
#[allow(dead_code)]
pub const MTP_TENSOR: &str = "model.layers.3.enorm.weight";

/// A tiny random DeepSeek-V3 (MLA; one dense layer, then two MoE layers of 8 routed experts,
/// 2 per token, and a shared expert) with the demo tokenizer and one multi-token-prediction
/// tensor, saved as a Hugging Face directory; returns that tensor's bytes.
#[allow(dead_code)]
pub fn deepseek_base(dir: &Path) -> Vec<u8> {
    deepseek_base_with_heads(dir, 3)
}

/// `deepseek_base` with `heads` attention heads.
#[allow(dead_code)]
pub fn deepseek_base_with_heads(dir: &Path, heads: usize) -> Vec<u8> {
    use kiln_model::safetensors_io::RawTensor;
    std::fs::create_dir_all(dir).unwrap();
    let config = r#"{
        "model_type": "deepseek_v3", "vocab_size": 99, "hidden_size": 48, "intermediate_size": 96,
        "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 3,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
        "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 12, "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1, "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 256
    }"#;
    let config = &config.replace(r#""num_attention_heads": 3"#, &format!(r#""num_attention_heads": {heads}"#));
    std::fs::write(dir.join("config.json"), config).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(DEMO_BASE).join(f), dir.join(f)).unwrap();
    }
    let mut model = kiln_model::Model::random(&kiln_core::Cpu, kiln_model::Config::parse(config).unwrap(), 1);
    let mtp: Vec<u8> = (0..48u32).flat_map(|i| half::bf16::from_f32(i as f32 / 7.0).to_le_bytes()).collect();
    model.passthrough.push(RawTensor {
        name: MTP_TENSOR.into(),
        dtype: safetensors::Dtype::BF16,
        shape: vec![48],
        bytes: mtp.clone(),
    });
    model.save_weights(&kiln_core::Cpu, dir).unwrap();
    mtp
}

/// A random Llama whose training state (about 30M parameters, 0.5 GB with gradients and
/// AdamW's moments) outweighs its activations on short rows, with the demo tokenizer, saved as
/// a Hugging Face directory: memory tests see the layout's share of that state.
#[allow(dead_code)]
pub fn wide_llama_base(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = r#"{
        "model_type": "llama", "vocab_size": 99, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 256
    }"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(DEMO_BASE).join(f), dir.join(f)).unwrap();
    }
    let model = kiln_model::Model::random(&kiln_core::Cpu, kiln_model::Config::parse(config).unwrap(), 3);
    model.save_weights(&kiln_core::Cpu, dir).unwrap();
}

/// A tiny random DeepSeek-V4 (sliding, compressed sparse and heavily compressed attention; a
/// hash-routed MoE layer, then two scored ones; two hyper-connected streams) with the demo
/// tokenizer, saved as a Hugging Face directory.
#[allow(dead_code)]
pub fn deepseek_v4_base(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = std::fs::read_to_string(TINY_V4).unwrap();
    std::fs::write(dir.join("config.json"), &config).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(DEMO_BASE).join(f), dir.join(f)).unwrap();
    }
    let model = kiln_model::Model::random(&kiln_core::Cpu, kiln_model::Config::parse(&config).unwrap(), 1);
    model.save_weights(&kiln_core::Cpu, dir).unwrap();
}

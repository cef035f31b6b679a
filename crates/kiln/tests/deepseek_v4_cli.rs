//! DeepSeek-V4 end to end on a tiny random model (every attention type, hash and scored MoE,
//! hyper-connections): SFT and DPO train, an export keeps DeepSeek's tensor names and the
//! int64 token-to-expert table, and the export scores as the checkpoint does.

mod common;

use common::deepseek_v4_base;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-v4-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chat_row(i: usize) -> String {
    let (a, b) = (i * 7 % 50, i * 13 % 40);
    format!(
        r#"{{"messages": [{{"role": "user", "content": "What is {a} plus {b}?"}}, {{"role": "assistant", "content": "{}"}}]}}"#,
        a + b
    )
}

fn pair(i: usize) -> String {
    let (a, b) = (i * 7 % 30, i * 13 % 30);
    format!(
        r#"{{"messages": [{{"role": "user", "content": "What is {a} plus {b}?"}}], "chosen": "{}", "rejected": "no idea"}}"#,
        a + b
    )
}

/// A run directory over `base` with `train`/`eval` rows and `section` appended to the config.
fn make_run(base: &Path, name: &str, train: &[String], eval: &[String], section: &str) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("train.jsonl"), train.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), eval.join("\n") + "\n").unwrap();
    let toml = format!(
        "[model]\npath = {base:?}\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\nmax_seq_len = 64\n\
         [train]\nlr = 2e-3\nwarmup_steps = 2\nsteps = 12\nbatch_tokens = 512\nseed = 5\neval_every = 6\n{section}\n\
         [output]\ndir = \"out\"\nsave_every = 12\n"
    );
    std::fs::write(dir.join("run.toml"), toml).unwrap();
    dir
}

fn metrics(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v[key].as_f64())
        .collect()
}

#[test]
fn sft_trains_exports_and_the_export_scores_like_the_checkpoint() {
    let base = scratch_dir("sft-base").join("model");
    deepseek_v4_base(&base);
    let eval: Vec<String> = (500..510).map(chat_row).collect();
    let run = make_run(&base, "sft", &(0..80).map(chat_row).collect::<Vec<_>>(), &eval, "");
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let losses = metrics(&run, "loss");
    assert!(losses.last().unwrap() < &(0.8 * losses[0]), "loss should fall: {losses:?}");

    let ckpt = run.join("out/checkpoints/step-00000012");
    let exported = run.join("export");
    let out = kiln(&["export", ckpt.to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(exported.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["model.layers.1.attn.indexer.wq_b.weight", "model.layers.2.attn.compressor.ape", "model.hc_head.hc_fn"]
    {
        assert!(st.tensor(name).is_ok(), "{name} missing from the export");
    }
    let table = st.tensor("model.layers.0.ffn.gate.tid2eid").expect("the hash table");
    assert_eq!((table.dtype(), table.shape()), (safetensors::Dtype::I64, &[99usize, 2][..]));

    let tokens = run.join("tokens.jsonl");
    std::fs::write(&tokens, "{\"ids\": [5, 9, 17, 3, 40, 41, 42, 43, 44, 12, 13, 14, 15]}\n").unwrap();
    let score = |model: &Path| {
        let out = kiln(&["score", "--model", model.to_str().unwrap(), "--tokens", tokens.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(score(&exported), score(&ckpt), "the export scores as the checkpoint");
}

#[test]
fn dpo_trains_toward_the_chosen_answers() {
    let base = scratch_dir("dpo-base").join("model");
    deepseek_v4_base(&base);
    let eval: Vec<String> = (1000..1020).map(pair).collect();
    let run = make_run(&base, "dpo", &(0..120).map(pair).collect::<Vec<_>>(), &eval, "[dpo]\nbeta = 0.1\n");
    let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let accuracy = metrics(&run, "eval_rewards/accuracies");
    assert_eq!(accuracy[0], 0.0, "policy = reference at step 0");
    assert!(accuracy.last().unwrap() > &0.5, "held-out preference accuracy: {accuracy:?}");
}

//! DeepSeek-V4 end to end on a tiny random model (every attention type, hash and scored MoE,
//! hyper-connections): SFT, DPO, GRPO and on-policy distillation train, an export keeps
//! DeepSeek's tensor names and the int64 token-to-expert table, and the export scores as the
//! checkpoint does.

mod common;

use common::{chat_row, deepseek_v4_base, kiln, scratch_dir};
use std::path::{Path, PathBuf};

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

/// Runs `recipe` on the run directory's `run.toml`, which must succeed.
fn train(recipe: &str, run: &Path) {
    let out = kiln(&[recipe, run.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
    train("sft", &run);
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
    train("dpo", &run);
    let accuracy = metrics(&run, "eval_rewards/accuracies");
    assert_eq!(accuracy[0], 0.0, "policy = reference at step 0");
    assert!(accuracy.last().unwrap() > &0.5, "held-out preference accuracy: {accuracy:?}");
}

const PROMPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/grpo_prompts.jsonl");

/// A run of `recipe` on `PROMPTS` from the model at `base`, with `section` as its recipe's
/// settings; returns every step's `key`.
fn rollout_run(base: &Path, name: &str, recipe: &str, section: &str, key: &str) -> Vec<f64> {
    let run = scratch_dir(name);
    let toml = format!(
        "[model]\npath = {base:?}\n[data]\ntrain = {PROMPTS:?}\nmax_seq_len = 96\n\
         [train]\nlr = 3e-3\nsteps = 24\nbatch_tokens = 96\nseed = 3\n{section}\n[output]\ndir = \"out\"\n"
    );
    std::fs::write(run.join("run.toml"), toml).unwrap();
    train(recipe, &run);
    let values = metrics(&run, key);
    assert_eq!(values.len(), 24, "{key} every step");
    values
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// GRPO samples with V4's window and compressed caches (completions run past the window and
/// complete compressed windows) and trains toward a format reward.
#[test]
fn grpo_raises_the_reward() {
    let base = scratch_dir("grpo-base").join("model");
    deepseek_v4_base(&base);
    let section = "[grpo]\ngroup_size = 8\nprompts_per_step = 4\nmax_new_tokens = 24\n\
                   [[grpo.rewards]]\ntype = \"format\"\npattern = \"7\"\n";
    let reward = rollout_run(&base, "grpo", "grpo", section, "reward");
    // Over seeds 1-4 the mean of the first four steps is 0.13-0.20, of the last four 0.54-0.68.
    let (first, last) = (mean(&reward[..4]), mean(&reward[20..]));
    assert!(last > 2.0 * first && last > first + 0.25, "reward should rise: {reward:?}");
}

/// On-policy distillation from a second random V4: the student's reverse KL to it falls.
#[test]
fn distillation_lowers_the_reverse_kl() {
    let dir = scratch_dir("distill-models");
    let (student, teacher) = (dir.join("student"), dir.join("teacher"));
    deepseek_v4_base(&student);
    deepseek_v4_base(&teacher);
    let config = kiln_model::Config::parse(&std::fs::read_to_string(teacher.join("config.json")).unwrap()).unwrap();
    kiln_model::Model::random(&kiln_core::Cpu, config, 2).save_weights(&kiln_core::Cpu, &teacher).unwrap();
    let section = format!("[distill]\nteacher = {teacher:?}\nprompts_per_step = 8\nmax_new_tokens = 24\n");
    let kl = rollout_run(&student, "distill", "distill", &section, "reverse_kl");
    let (first, last) = (mean(&kl[..4]), mean(&kl[20..]));
    assert!(last < 0.75 * first, "reverse KL should fall: {kl:?}");
}

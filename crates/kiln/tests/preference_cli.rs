//! `kiln dpo` and `kiln rm` end to end on the demo base model: held-out preference accuracy
//! rises, the reference log-probs are cached and reused on resume, bad rows are named, and a
//! reward model exports as a sequence classification model that `kiln score --reward` reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-dpo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Prefer the sum to an evasive answer.
fn pair(i: usize) -> String {
    let (a, b) = (i * 7 % 30, i * 13 % 30);
    format!(
        r#"{{"messages": [{{"role": "user", "content": "What is {a} plus {b}?"}}], "chosen": "{}", "rejected": "no idea"}}"#,
        a + b
    )
}

fn make_run(name: &str, train: &[String], loss: &str) -> PathBuf {
    make_run_with(name, train, &format!("[dpo]\nloss = {loss}\nbeta = 0.1\n"))
}

fn make_run_with(name: &str, train: &[String], section: &str) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("train.jsonl"), train.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), (1000..1040).map(pair).collect::<Vec<_>>().join("\n")).unwrap();
    let toml = format!(
        "[model]\npath = {BASE:?}\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\nmax_seq_len = 64\n\
         [train]\nlr = 1e-4\nwarmup_steps = 2\nsteps = 20\nbatch_tokens = 1024\nseed = 3\n\
         {section}[output]\ndir = \"out\"\nsave_every = 10\n"
    );
    std::fs::write(dir.join("run.toml"), toml).unwrap();
    dir
}

fn eval_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["eval_loss"].is_number())
        .collect()
}

#[test]
fn dpo_reads_trl_implicit_prompt_pairs() {
    // TRL's implicit-prompt preference rows: whole conversations (or texts) whose shared start
    // is the prompt. The same pairs with explicit prompts give the same first-step loss.
    let conversation = |i: usize, answer: &str| {
        let (a, b) = (i * 7 % 30, i * 13 % 30);
        format!(
            r#"[{{"role": "user", "content": "What is {a} plus {b}?"}}, {{"role": "assistant", "content": "{answer}"}}]"#
        )
    };
    let sum = |i: usize| (i * 7 % 30 + i * 13 % 30).to_string();
    let implicit: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"chosen": {}, "rejected": {}}}"#, conversation(i, &sum(i)), conversation(i, "no idea")))
        .collect();
    let text: Vec<String> =
        (0..40).map(|i| format!(r#"{{"chosen": "{0}+1= {1}", "rejected": "{0}+1= no"}}"#, i, i + 1)).collect();
    let mut first_losses = Vec::new();
    for (name, rows) in [("implicit", implicit), ("explicit", (0..40).map(pair).collect()), ("implicit-text", text)] {
        let run = make_run(name, &rows, "\"sigmoid\"");
        let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet", "--set", "train.steps=2"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let first = std::fs::read_to_string(run.join("out/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["grad_norm"].is_number())
            .unwrap();
        first_losses.push((first["loss"].as_f64().unwrap(), first["grad_norm"].as_f64().unwrap()));
    }
    assert_eq!(first_losses[0], first_losses[1], "implicit and explicit prompts are the same pairs");
}

#[test]
fn dpo_raises_held_out_preference_accuracy_and_caches_the_reference() {
    let run = make_run("sigmoid", &(0..200).map(pair).collect::<Vec<_>>(), "\"sigmoid\"");
    let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reference log-probs of 480 sequences computed"), "{stderr}");
    let evals = eval_records(&run);
    let (first, last) = (&evals[0], evals.last().unwrap());
    assert_eq!(first["step"], 0);
    assert_eq!(first["eval_rewards/accuracies"], 0.0, "policy = reference at step 0");
    assert!(last["eval_rewards/accuracies"].as_f64().unwrap() > 0.9, "{last}");
    assert!(last["eval_loss"].as_f64().unwrap() < 0.5 * first["eval_loss"].as_f64().unwrap(), "{last}");
    let train: Vec<serde_json::Value> = std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["grad_norm"].is_number())
        .collect();
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"] {
        assert!(train[5][key].is_number(), "metrics lack {key}: {}", train[5]);
    }

    // Resuming reuses the cached reference log-probs instead of loading the base again.
    let ckpt = run.join("out/checkpoints/step-00000010");
    let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet", "--resume", ckpt.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("reference log-probs"), "the cache was not used: {stderr}");
}

#[test]
fn reference_free_losses_train_without_a_reference() {
    let run = make_run("simpo", &(0..120).map(pair).collect::<Vec<_>>(), "[\"simpo\", \"orpo\"]");
    let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!run.join("out/reference_logps.json").exists() && !stderr.contains("reference log-probs"));
    let evals = eval_records(&run);
    let last = evals.last().unwrap();
    assert!(last["eval_prefers_chosen"].as_f64().unwrap() > 0.9, "{last}");
}

#[test]
fn data_inspect_reads_pairs_with_their_margins() {
    let mut rows: Vec<String> = (0..10).map(pair).collect();
    rows[0] = rows[0].replace(r#""rejected""#, r#""margin": 0.5, "rejected""#);
    let run = make_run_with("inspect", &rows, "[rm]\n");
    let out = kiln(&["data", "inspect", run.join("run.toml").to_str().unwrap(), "--samples", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("train: 20 answers (chosen and rejected)"), "{text}");
    assert!(text.contains("eval: 80 answers"), "{text}");
    assert!(text.contains("train.jsonl:1 (chosen") && text.contains(", margin 0.5)"), "{text}");
    // Only the answers carry loss: the sum, and the evasion.
    assert!(text.contains("assistant\n[[0<|im_end|>\n]]") && text.contains("[[no idea<|im_end|>\n]]"), "{text}");
}

#[test]
fn bad_preference_rows_are_named() {
    let mut rows: Vec<String> = (0..20).map(pair).collect();
    rows[3] = r#"{"messages": [{"role": "user", "content": "hi"}], "chosen": "a"}"#.into();
    rows[7] = r#"{"prompt": "2+2=", "chosen": "4", "rejected": "4"}"#.into();
    let run = make_run("bad", &rows, "\"sigmoid\"");
    let out = kiln(&["dpo", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("train.jsonl:4: field `rejected` is missing"), "{stderr}");
    assert!(stderr.contains("train.jsonl:8: fields `chosen` and `rejected` are identical"), "{stderr}");
}

#[test]
fn reward_model_trains_exports_and_scores() {
    let run = make_run_with("rm", &(0..200).map(pair).collect::<Vec<_>>(), "[rm]\ncenter_rewards_coefficient = 0.01\n");
    let out = kiln(&["rm", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evals = eval_records(&run);
    let (first, last) = (&evals[0], evals.last().unwrap());
    assert!(last["eval_accuracy"].as_f64().unwrap() > 0.9, "{last}");
    assert!(last["eval_loss"].as_f64().unwrap() < first["eval_loss"].as_f64().unwrap(), "{first} -> {last}");

    let export = run.join("export");
    let ckpt = run.join("out/checkpoints/step-00000020");
    let out = kiln(&["export", ckpt.to_str().unwrap(), "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    let bytes = std::fs::read(export.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("score.weight").unwrap().shape(), &[1, 192]);
    assert!(st.tensor("lm_head.weight").is_err());

    let tokens = run.join("tokens.jsonl");
    std::fs::write(&tokens, "{\"ids\": [5, 6, 7, 8]}\n{\"ids\": [9, 10, 11]}\n").unwrap();
    let out = kiln(&["score", "--reward", "--model", export.to_str().unwrap(), "--tokens", tokens.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        std::str::from_utf8(&out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["reward"].as_f64().is_some_and(f64::is_finite)), "{lines:?}");
    let out = kiln(&["score", "--reward", "--model", BASE, "--tokens", tokens.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reward needs a reward model"));

    // The reward model as a GRPO reward.
    let grpo_out = run.join("grpo");
    let rewards = format!("grpo.rewards=[{{type = \"model\", path = {:?}}}]", export.display().to_string());
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/grpo.toml");
    let dir = format!("output.dir={:?}", grpo_out.display().to_string());
    let out = kiln(&["grpo", example, "--quiet", "--set", "train.steps=2", "--set", &rewards, "--set", &dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = std::fs::read_to_string(grpo_out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"rewards/model/mean\""), "{metrics}");
}

//! `kiln kto` end to end on the demo base model: unpaired completions, conversational and
//! text, labelled desirable (the right sum) or not (an evasion); on held-out rows the reward
//! margin between the two grows and the loss falls, TRL's metrics are logged with the KL
//! reference point, the reference log-probs are cached, and a row without a label is named
//! by file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-kto-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Row `i`: a question, and its right answer (desirable) or an evasion (not); every third
/// row is text, the rest conversational.
fn row(i: usize) -> String {
    let (a, b) = (i * 7 % 30, i * 13 % 30);
    let desirable = i.is_multiple_of(2);
    let answer = if desirable { (a + b).to_string() } else { "no idea".into() };
    match i % 3 {
        0 => format!(r#"{{"prompt": "{a}+{b}=", "completion": "{answer}", "label": {desirable}}}"#),
        _ => format!(
            r#"{{"prompt": [{{"role": "user", "content": "What is {a} plus {b}?"}}], "completion": [{{"role": "assistant", "content": "{answer}"}}], "label": {desirable}}}"#
        ),
    }
}

fn make_run(name: &str, train: &[String]) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("train.jsonl"), train.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), (1000..1060).map(row).collect::<Vec<_>>().join("\n")).unwrap();
    let toml = format!(
        "[model]\npath = {BASE:?}\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\nmax_seq_len = 64\n\
         [train]\nlr = 1e-4\nwarmup_steps = 2\nsteps = 20\nbatch_tokens = 1024\nseed = 3\neval_every = 10\n\
         [kto]\nbeta = 0.1\n[output]\ndir = \"out\"\nsave_every = 10\n"
    );
    std::fs::write(dir.join("run.toml"), toml).unwrap();
    dir
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .collect()
}

#[test]
fn kto_separates_desirable_from_undesirable_completions() {
    let run = make_run("train", &(0..240).map(row).collect::<Vec<_>>());
    let out = kiln(&["kto", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    // Completions and their mismatched pairs, of train and eval.
    assert!(stderr.contains("reference log-probs of 600 sequences computed"), "{stderr}");
    assert!(stdout.contains("done after 20 steps"), "{stdout}");
    let all = records(&run);
    let evals: Vec<&serde_json::Value> = all.iter().filter(|v| v["eval_loss"].is_number()).collect();
    let (first, last) = (evals[0], evals[evals.len() - 1]);
    assert_eq!(first["step"], 0);
    assert_eq!(first["eval_rewards/margins"], 0.0, "policy = reference at step 0");
    assert!(last["eval_rewards/margins"].as_f64().unwrap() > 0.5, "{last}");
    assert!(last["eval_loss"].as_f64().unwrap() < 0.8 * first["eval_loss"].as_f64().unwrap(), "{first} {last}");
    let steps: Vec<&serde_json::Value> = all.iter().filter(|v| v["grad_norm"].is_number()).collect();
    assert_eq!(steps.len(), 20);
    for key in ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    {
        assert!(steps[5][key].is_number(), "metrics lack {key}: {}", steps[5]);
    }
    assert!(steps.iter().all(|v| v["kl"].as_f64().unwrap() >= 0.0), "the KL point is clamped at 0");
    assert!(run.join("out/checkpoints/step-00000020/model.safetensors").exists());

    // Resuming reuses the cached reference log-probs.
    let out = kiln(&["kto", run.join("run.toml").to_str().unwrap(), "--quiet", "--set", "train.steps=22", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("reference log-probs of"), "{stderr}");
}

#[test]
fn data_inspect_reads_unpaired_completions() {
    let run = make_run("inspect", &(0..12).map(row).collect::<Vec<_>>());
    let out = kiln(&["data", "inspect", run.join("run.toml").to_str().unwrap(), "--samples", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("train: 12 completions (6 desirable, 6 undesirable)"), "{text}");
    assert!(text.contains("(desirable, ") && text.contains("(undesirable, "), "{text}");
    assert!(text.contains("0+0=[[0<|im_end|>]]"), "the text row's completion carries the loss: {text}");
}

#[test]
fn a_row_without_a_label_is_named() {
    let mut rows: Vec<String> = (0..10).map(row).collect();
    rows[3] = r#"{"prompt": "1+1=", "completion": "2"}"#.into();
    let run = make_run("bad-row", &rows);
    let out = kiln(&["kto", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("train.jsonl:4") && stderr.contains("field `label` is missing"), "{stderr}");
}

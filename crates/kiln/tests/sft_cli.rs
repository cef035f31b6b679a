//! `kiln sft`, `kiln export` and `kiln data inspect` end to end on the demo base model:
//! exact resume across kill -9, bad-row reports, config errors, and export round trips.

mod common;

use common::{chat_row, deepseek_base, kiln, scratch_dir, MTP_TENSOR};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");

/// A run directory with train/eval data and a run.toml; `extra` is appended to [train].
fn make_run(name: &str, rows: &[String], extra: &str, save_every: u64) -> PathBuf {
    make_run_on(Path::new(BASE), name, rows, extra, save_every)
}

/// `make_run` from the model directory `base`.
fn make_run_on(base: &Path, name: &str, rows: &[String], extra: &str, save_every: u64) -> PathBuf {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("train.jsonl"), rows.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), (500..520).map(chat_row).collect::<Vec<_>>().join("\n")).unwrap();
    let toml = format!(
        "[model]\npath = {base:?}\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\nmax_seq_len = 64\n\
         [train]\nlr = 1e-3\nwarmup_steps = 2\nsteps = 10\nbatch_tokens = 256\ngrad_accum = 2\nseed = 5\neval_every = 5\n{extra}\n\
         [output]\ndir = \"out\"\nsave_every = {save_every}\nkeep_last = 3\n"
    );
    std::fs::write(dir.join("run.toml"), toml).unwrap();
    dir
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

/// Finished checkpoints (`step-NNNNNNNN`), oldest first; not the `.tmp`/`.old` leftovers.
fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let finished =
        |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.len() == 13 && n.starts_with("step-"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("out/checkpoints"))
        .map(|d| d.flatten().map(|e| e.path()).filter(finished).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Every finished checkpoint must be whole: its state parses and its tensors load.
fn assert_checkpoints_whole(run: &Path) {
    for c in checkpoints(run) {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c.join("state.json")).unwrap()).unwrap();
        assert!(state["step"].as_u64().is_some(), "{}", c.display());
        for f in ["config.json", "tokenizer.json"] {
            assert!(c.join(f).exists(), "{} lacks {f}: it could not be resumed or exported", c.display());
        }
        for f in ["model.safetensors", "adam_m.safetensors", "adam_v.safetensors"] {
            let bytes = std::fs::read(c.join(f)).unwrap();
            safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", c.join(f).display()));
        }
    }
}

#[test]
fn resume_after_kill_9_is_bit_exact() {
    let rows: Vec<String> = (0..60).map(chat_row).collect();
    let straight = make_run("straight", &rows, "", 0);
    let out = kiln(&["sft", straight.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Same run, saving every step, killed with SIGKILL again and again until it finishes.
    let killed = make_run("killed", &rows, "", 1);
    let mut kills = 0;
    for attempt in 0.. {
        assert!(attempt < 20, "the run never finished: each attempt saves a checkpoint, and there are 10 steps");
        let mut args = vec!["sft".to_string(), killed.join("run.toml").display().to_string(), "--quiet".into()];
        // Killed before its first checkpoint: start over; else resume.
        if !checkpoints(&killed).is_empty() {
            args.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill only after this attempt has saved a checkpoint of its own, so every attempt makes
        // progress however slow the machine; the jitter lands the kill in different phases
        // (mid-step, mid-save, mid-rotation).
        let before = checkpoints(&killed).last().cloned();
        let started = std::time::Instant::now();
        while checkpoints(&killed).last() == before.as_ref() && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint in 5 minutes");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(37 * (attempt % 7)));
        if child.try_wait().unwrap().is_some_and(|s| s.success()) {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            break;
        }
        kills += 1;
        assert_checkpoints_whole(&killed);
    }
    assert!(kills >= 2, "the run was killed only {kills} times; the test proves nothing");

    let (a, b) = (losses(&straight), losses(&killed));
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "the loss curve of the killed-and-resumed run differs from the straight run");
    let last = |run: &Path| std::fs::read(checkpoints(run).last().unwrap().join("model.safetensors")).unwrap();
    assert!(last(&straight) == last(&killed), "final weights differ");
}

#[test]
fn sigterm_saves_a_checkpoint_and_resume_finishes_the_run() {
    let rows: Vec<String> = (0..60).map(chat_row).collect();
    let run = make_run("sigterm", &rows, "", 0);
    let config = run.join("run.toml");
    let args =
        ["sft", config.to_str().unwrap(), "--quiet", "--set", "train.steps=150", "--set", "output.tensorboard=true"];
    let child =
        Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until training is under way (however slow the machine), then ask it to stop.
    let started = std::time::Instant::now();
    while losses(&run).len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "no training step in 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "SIGTERM must end the run cleanly");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted after"), "{stdout}");
    let saved = checkpoints(&run);
    let step: u64 = saved.last().unwrap().file_name().unwrap().to_str().unwrap()[5..].parse().unwrap();
    assert!((1..150).contains(&step), "checkpoint at step {step}");
    let out = kiln(&[&args[..], &["--resume"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(losses(&run).len(), 150, "the resumed run completes every step once");
    assert_tensorboard_shows(&run.join("out"), step);
}

/// TensorBoard's view of a run stopped after `stopped_at` and resumed: two event files, the
/// second purging from `stopped_at + 1`, and together every step's `train/loss` as
/// metrics.jsonl has it.
fn assert_tensorboard_shows(out: &Path, stopped_at: u64) {
    use kiln_train::tensorboard::{read_events, EventKind};
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .collect();
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    assert_eq!(files.len(), 2, "one event file per attempt: {files:?}");
    let mut shown = std::collections::BTreeMap::new();
    for f in &files {
        for e in read_events(f).unwrap() {
            match e.kind {
                EventKind::SessionStart => {
                    assert_eq!(e.step, stopped_at + 1, "the resumed file purges from the step it takes up");
                    shown.retain(|&s, _| s < e.step);
                }
                EventKind::Scalars(values) => {
                    for (_, v) in values.into_iter().filter(|(t, _)| t == "train/loss") {
                        shown.insert(e.step, v);
                    }
                }
                EventKind::FileVersion(_) => {}
            }
        }
    }
    let expected: std::collections::BTreeMap<u64, f32> =
        losses(out.parent().unwrap()).into_iter().map(|(s, l)| (s, l as f32)).collect();
    assert_eq!(shown, expected);
}

#[test]
fn bad_rows_are_reported_with_file_and_line() {
    let mut rows: Vec<String> = (0..20).map(chat_row).collect();
    rows[3] = r#"{"messages": [{"role": "user", "content": "no answer"}]}"#.into(); // nothing to train on
    rows[7] = r#"{"messages": [{"role": "robot", "content": "hi"}]}"#.into(); // the template refuses
    rows[11] = "{not json".into();
    rows[15] = format!(r#"{{"text": "{}"}}"#, "x".repeat(200)); // longer than max_seq_len
    let run = make_run("bad", &rows, "", 0);
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("4 of 20 rows are bad"), "{err}");
    let train = run.join("train.jsonl").display().to_string();
    for (line, what) in
        [(4, "no trainable token"), (8, "unknown role: robot"), (12, "invalid JSON"), (16, "more than max_seq_len 64")]
    {
        assert!(
            err.contains(&format!("{train}:{line}: ")) && err.contains(what),
            "line {line} ({what}) not reported:\n{err}"
        );
    }
    // Tolerating a fifth of the rows, the run goes ahead and still names them.
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet", "--set", "data.max_bad_fraction=0.25"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{train}:12: invalid JSON")));
}

#[test]
fn unknown_config_keys_are_named() {
    let run = make_run("unknown-key", &[chat_row(1)], "learning_rate = 3", 0);
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("run.toml") && err.contains("unknown field `learning_rate`"),
        "{err}"
    );
}

#[test]
fn expert_parallel_that_cannot_split_is_refused_with_the_reason() {
    let run = make_run("ep-refused", &[chat_row(1)], "", 0);
    let toml = run.join("run.toml");
    let refused = |sets: &[&str], expected: &str| {
        let mut args = vec!["sft", toml.to_str().unwrap()];
        sets.iter().for_each(|s| args.extend(["--set", s]));
        let out = kiln(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expected), "{sets:?}: {err}");
    };
    // The demo base is dense; the DeepSeek base has 8 routed experts; this is one process.
    refused(&["train.ep=2"], "has no MoE layers to split");
    let base = scratch_dir("ep-refused-base");
    deepseek_base(&base);
    let model = format!("model.path={:?}", base.display().to_string());
    refused(&[&model, "train.ep=3"], "does not divide the 8 routed experts");
    refused(&[&model, "train.ep=2"], "does not divide the 1 data-parallel ranks of the run");
}

#[test]
fn layouts_the_engine_cannot_run_are_refused_with_the_reason() {
    let run = make_run("layout-refused", &[chat_row(1)], "", 0);
    let toml = run.join("run.toml");
    let refused = |layout: &str, expected: &str| {
        let out = kiln(&["sft", toml.to_str().unwrap(), "--layout", layout]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && err.contains(expected), "{layout}: {err}");
        err
    };
    for (layout, why) in [
        ("dp=1,tp=2", "1·2·1 = 2 does not equal the 1 ranks of the launch"),
        ("tp=2", "tp = 2 does not divide the 1 ranks of the launch"),
        ("pp=2", "pp = 2 does not divide the 1 ranks of the launch"),
        ("tp=2,pp=2", "tp·pp = 2·2 does not divide the 1 ranks of the launch"),
        ("pp=0", "`pp` = `0` is not a positive whole number"),
        ("dp=2,zero=3", "does not equal the 1 ranks of the launch"),
        ("zero=5", "ZeRO has stages 0 to 3"),
    ] {
        assert!(refused(layout, why).contains(&format!("`train.layout` = \"{layout}\"")));
    }
    // The layout sets the keys it names: ep=2 on the dense demo base is refused as `train.ep` is.
    refused("ep=2", "`train.ep` = 2");
}

fn score(model: &Path, tokens: &Path) -> String {
    let out = kiln(&["score", "--model", model.to_str().unwrap(), "--tokens", tokens.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn export_writes_a_model_directory_that_scores_like_the_checkpoint() {
    let run = make_run("export", &(0..30).map(chat_row).collect::<Vec<_>>(), "", 0);
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet", "--set", "train.steps=3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ckpt = checkpoints(&run).pop().unwrap();
    let tokens = run.join("tokens.jsonl");
    std::fs::write(&tokens, "{\"ids\": [1, 60, 3, 20, 21, 22, 2]}\n{\"ids\": [40, 41, 42]}\n").unwrap();

    let f32_dir = run.join("export-f32");
    let out = kiln(&["export", ckpt.to_str().unwrap(), "--out", f32_dir.to_str().unwrap(), "--dtype", "f32"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(score(&f32_dir, &tokens), score(&ckpt, &tokens), "f32 export must score exactly like the checkpoint");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(f32_dir.join(f).exists(), "export lacks {f}");
    }

    // Default dtype: the base model's (bf16), recorded in config.json for transformers.
    let bf16_dir = run.join("export-bf16");
    let out = kiln(&["export", ckpt.to_str().unwrap(), "--out", bf16_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    assert!(size(&bf16_dir) * 2 < size(&f32_dir) + 4096, "bf16 export is not half the size");

    let again = kiln(&["export", ckpt.to_str().unwrap(), "--out", bf16_dir.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn data_inspect_shows_counts_and_the_loss_mask() {
    let run = make_run("inspect", &(0..12).map(chat_row).collect::<Vec<_>>(), "", 0);
    let out = kiln(&["data", "inspect", run.join("run.toml").to_str().unwrap(), "--samples", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("train: 12 examples"), "{text}");
    assert!(text.contains("eval: 20 examples"), "{text}");
    assert!(text.contains("packing:"), "{text}");
    // The demo's template marks its assistant turns itself.
    assert!(text.contains("they are found from the template's {% generation %} markers"), "{text}");
    // Only the assistant's answer and end-of-turn carry loss.
    assert!(
        text.contains("<|im_start|>user\nWhat is 0 plus 0?<|im_end|>\n<|im_start|>assistant\n[[0<|im_end|>]]"),
        "{text}"
    );
}

#[test]
fn data_inspect_shows_one_end_of_sequence_token_whether_or_not_the_text_has_it() {
    // A completion that already ends with EOS keeps just that one, as TRL adds EOS only when
    // missing; one without gets it.
    let rows = [
        r#"{"prompt": "2+2=", "completion": "4<|im_end|>"}"#.to_string(),
        r#"{"prompt": "3+3=", "completion": "6"}"#.to_string(),
        r#"{"text": "5+5=10<|im_end|>"}"#.to_string(),
    ];
    let run = make_run("inspect-eos", &rows, "", 0);
    let out = kiln(&["data", "inspect", run.join("run.toml").to_str().unwrap(), "--samples", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for shown in ["2+2=[[4<|im_end|>]]", "3+3=[[6<|im_end|>]]", "5[[+5=10<|im_end|>]]"] {
        assert!(text.contains(shown), "{shown} in {text}");
    }
    assert!(!text.contains("<|im_end|><|im_end|>"), "a doubled EOS: {text}");
}

#[test]
fn sft_reads_every_trl_language_modeling_and_prompt_completion_type() {
    // TRL's dataset types for SFT, standard and conversational, in one file: the loss falls on
    // the text, the assistant turns, and the completions.
    let rows = [
        r#"{"text": "7+1=8"}"#,
        r#"{"messages": [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]}"#,
        r#"{"prompt": "9+9=", "completion": "18"}"#,
        r#"{"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "completion": [{"role": "assistant", "content": "4"}]}"#,
    ]
    .map(String::from);
    let run = make_run("trl-types", &rows, "", 0);
    let out = kiln(&["data", "inspect", run.join("run.toml").to_str().unwrap(), "--samples", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for shown in [
        "7[[+1=8<|im_end|>]]",
        "<|im_start|>assistant\n[[7<|im_end|>]]",
        "9+9=[[18<|im_end|>]]",
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n[[4<|im_end|>\n]]",
    ] {
        assert!(text.contains(shown), "{shown} in {text}");
    }
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet", "--set", "train.steps=2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // TRL's metric names: the learning rate, the cumulative token count, the top-1 accuracy.
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["grad_norm"].is_number())
        .collect();
    assert_eq!(steps.len(), 2);
    let num = |i: usize, key: &str| steps[i][key].as_f64().unwrap_or_else(|| panic!("no {key} in {}", steps[i]));
    assert!(num(0, "num_tokens") > 0.0 && num(1, "num_tokens") == 2.0 * num(0, "num_tokens"), "{steps:?}");
    assert!((0.0..=1.0).contains(&num(1, "mean_token_accuracy")));
    assert!(num(1, "learning_rate") > 0.0);
}

#[test]
fn deepseek_v3_sft_trains_balances_and_exports() {
    let base = scratch_dir("deepseek-base").join("model");
    let mtp = deepseek_base(&base);
    let run = make_run_on(
        &base,
        "deepseek",
        &(0..60).map(chat_row).collect::<Vec<_>>(),
        "router_bias_rate = 0.01\nmoe_aux_loss_alpha = 0.001",
        0,
    );
    let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let l = losses(&run);
    assert!(l.last().unwrap().1 < l[0].1, "loss should fall: {l:?}");

    // Per-expert load of the MoE layer (layer 1) in every step's metrics.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["loss"].is_number())
        .collect();
    for r in &records {
        let load: Vec<u64> = r["expert_load"]["1"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(load.len(), 8, "{r}");
        assert!(load.iter().sum::<u64>() > 0 && r["expert_load_imbalance"].as_f64().unwrap() >= 1.0, "{r}");
        assert!(r["moe_aux_loss"].as_f64().unwrap() > 0.0, "{r}");
    }

    // Export: per-expert tensors, the router bias moved by the balancing, the MTP tensor as it was.
    let exported = run.join("export");
    let ckpt = checkpoints(&run).pop().unwrap();
    let out = kiln(&["export", ckpt.to_str().unwrap(), "--out", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(exported.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("model.layers.1.mlp.experts.7.down_proj.weight").is_ok());
    assert_eq!(st.tensor(MTP_TENSOR).unwrap().data(), &mtp[..], "MTP tensor changed");
    let bias = st.tensor("model.layers.1.mlp.gate.e_score_correction_bias").unwrap();
    assert_eq!(bias.dtype(), safetensors::Dtype::F32, "the router bias stays f32");
    assert!(bias.data().chunks_exact(4).any(|b| f32::from_le_bytes(b.try_into().unwrap()) != 0.0), "bias never moved");
}

/// `train.dtype = "bf16"`: the same run in mixed precision starts from the same loss up to
/// bf16 rounding and learns as the f32 run does.
#[test]
fn bf16_mixed_precision_trains_like_f32() {
    let rows: Vec<String> = (0..60).map(chat_row).collect();
    let (f32_run, bf16_run) =
        (make_run("dtype-f32", &rows, "dtype = \"f32\"", 0), make_run("dtype-bf16", &rows, "dtype = \"bf16\"", 0));
    for run in [&f32_run, &bf16_run] {
        let out = kiln(&["sft", run.join("run.toml").to_str().unwrap(), "--quiet"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = if run == &bf16_run { "matrix products: bf16 inputs, f32 sums" } else { "matrix products: f32" };
        assert!(stderr.contains(want), "the startup line must say the precision: {stderr}");
    }
    let (full, mixed) = (losses(&f32_run), losses(&bf16_run));
    assert_eq!((full.len(), mixed.len()), (10, 10));
    assert_ne!(full, mixed, "the bf16 run must compute in bf16");
    // Step 1 is the same function of the same weights with every product input rounded by at
    // most u = 2⁻⁸ (relative): its loss may move by a few u, not more.
    let (first_f32, first_bf16) = (full[0].1, mixed[0].1);
    assert!((first_f32 - first_bf16).abs() <= 4.0 * 2f64.powi(-8) * first_f32, "{first_f32} vs {first_bf16}");
    // And it learns: the last loss is as far below the first as f32's, within a tenth.
    let (drop_f32, drop_bf16) = (first_f32 - full[9].1, first_bf16 - mixed[9].1);
    assert!(drop_f32 > 0.0 && (drop_bf16 - drop_f32).abs() <= 0.1 * drop_f32, "f32 fell {drop_f32}, bf16 {drop_bf16}");
    // Checkpoints keep f32 masters in the model's own dtype.
    let model_dtype = |run: &Path| {
        let bytes = std::fs::read(checkpoints(run).last().unwrap().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors().iter().map(|(_, t)| t.dtype()).collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(model_dtype(&f32_run), model_dtype(&bf16_run));
}

//! `kiln grpo` end to end on the demo base model: the reward rises, metrics carry the RL
//! numbers, micro-batching leaves the steps unchanged where TRL's normalisation says so,
//! `num_iterations` reuses a rollout, TRL's conversational prompts run and their other columns
//! reach reward programs, and a reward command that fails stops the run with its name.

use std::path::PathBuf;
use std::process::{Command, Output};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-grpo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn grpo(name: &str, extra: &[&str]) -> (Output, PathBuf) {
    let out_dir = scratch_dir(name);
    let mut args = vec![
        "grpo".to_string(),
        format!("{EXAMPLES}/grpo.toml"),
        "--quiet".into(),
        "--set".into(),
        format!("output.dir={:?}", out_dir.display().to_string()),
    ];
    for e in extra {
        args.extend(["--set".to_string(), e.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (kiln(&refs), out_dir)
}

#[test]
fn grpo_raises_the_reward() {
    let (out, dir) = grpo("rises", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["reward"].is_number())
        .collect();
    assert_eq!(steps.len(), 20);
    let mean = |s: &[serde_json::Value]| s.iter().map(|v| v["reward"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&steps[..4]), mean(&steps[16..]));
    assert!(last > 2.0 * first && last > 0.4, "reward should rise: first steps {first:.3}, last steps {last:.3}");
    for key in [
        "reward_std",
        "rewards/format/mean",
        "rewards/format/std",
        "completions/mean_length",
        "clip_ratio/high_mean",
        "rollout_tokens_per_s",
        "grad_norm",
        "learning_rate",
        "num_tokens",
    ] {
        assert!(steps[3][key].is_number(), "metrics lack {key}: {}", steps[3]);
    }
    // The policy's entropy per sampled token: positive, and below log(vocab), 99 tokens.
    let entropy = steps[3]["entropy"].as_f64().expect("metrics carry entropy");
    assert!(entropy > 0.0 && entropy < (99f64).ln(), "entropy {entropy}");
    assert!(dir.join("reward.png").exists(), "the run plots its reward");
}

fn step_metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["reward"].is_number())
        .collect()
}

#[test]
fn micro_batches_give_the_same_steps_and_iterations_reuse_a_rollout() {
    // 8 prompts × 8 completions a step: one micro-batch of 64 against 8 of 8 (TRL's grpo loss,
    // a mean of micro-batch means, is the same for equal micro-batches), and under dapo (the
    // step's token mean) against 13 of 5. In f32 every step agrees. In bf16 the first step
    // does too; from the second on, the f32 masters differ by one summation order, which may
    // turn a weight's bf16 rounding over and move small losses by more than f32 noise, so only
    // the first step is held there. Micro-batches of 5 also split groups, whose completions
    // then share their prompt's row with others than in one micro-batch of 64: attention sums
    // in other blocks, and in bf16 an f32 rounding apart can round a product's input the other
    // way, so that comparison holds bf16 to its own rounding (the f32 one stays at 1e-5).
    for (dtype, steps_held, split_groups) in [("f32", 4, 1e-5), ("bf16", 1, 1e-3)] {
        let common = ["train.steps=4", "grpo.num_iterations=2"];
        let dtype_set = format!("train.dtype=\"{dtype}\"");
        let run = |name: &str, extra: &[&str]| {
            let (out, dir) = grpo(&format!("{name}-{dtype}"), &[&common[..], &[dtype_set.as_str()], extra].concat());
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            step_metrics(&dir)
        };
        let same_steps = |what: &str, a: &[serde_json::Value], b: &[serde_json::Value], tolerance: f64| {
            assert_eq!((a.len(), b.len()), (4, 4), "{what}");
            for (a, b) in a.iter().zip(b).take(steps_held) {
                for key in ["loss", "grad_norm", "reward", "clip_ratio/high_mean"] {
                    let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
                    assert!(
                        (x - y).abs() <= tolerance * (1.0 + x.abs()),
                        "{dtype}, {what} step {}: {key} {x} vs {y}",
                        a["step"]
                    );
                }
            }
        };
        let whole = run("whole", &["grpo.micro_batch=64"]);
        same_steps("8 micro-batches of 8", &whole, &run("split", &["grpo.micro_batch=8"]), 1e-5);
        let dapo = "grpo.loss_type=\"dapo\"";
        same_steps(
            "dapo, 13 of 5",
            &run("whole-dapo", &["grpo.micro_batch=64", dapo]),
            &run("uneven", &["grpo.micro_batch=5", dapo]),
            split_groups,
        );
        // Steps 1-2 train on one rollout, 3-4 on the next; the second step of a rollout sees a
        // policy that moved since sampling, so its ratios (and loss) differ from the first's.
        let iterations: Vec<u64> = whole.iter().map(|v| v["iteration"].as_u64().unwrap()).collect();
        assert_eq!(iterations, [1, 2, 1, 2]);
        assert_eq!(whole[0]["reward"], whole[1]["reward"]);
        assert_eq!(whole[0]["completions/mean_length"], whole[1]["completions/mean_length"]);
        assert_ne!(whole[0]["loss"], whole[1]["loss"]);
    }
}

#[test]
fn conversational_prompts_and_their_columns_reach_the_rewards() {
    // TRL's conversational prompt-only rows (`prompt` as messages), with a column of their own
    // that a reward program reads: 1 when the sample carries it, else 0.
    let dir = scratch_dir("columns-data");
    let rows: Vec<String> = (0..16)
        .map(|i| {
            format!(
                r#"{{"prompt": [{{"role": "user", "content": "What is {i} plus 1?"}}], "answer": "{}", "solution": "s{i}"}}"#,
                i + 1
            )
        })
        .collect();
    let file = dir.join("prompts.jsonl");
    std::fs::write(&file, rows.join("\n")).unwrap();
    let train = format!("data.train={:?}", file.display().to_string());
    let judge = r#"grpo.rewards=[{type = "command", name = "judge", command = ["sh", "-c", "while read -r l; do case \"$l\" in *'\"solution\":\"s'*) echo 1;; *) echo 0;; esac; done"]}]"#;
    let (out, run) = grpo("columns", &["train.steps=2", "grpo.prompts_per_step=4", "data.eval=[]", &train, judge]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps = step_metrics(&run);
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|v| v["rewards/judge/mean"] == 1.0), "every sample carries its column: {steps:?}");

    // `kiln data inspect` shows the prompts as the generator gets them, with their columns.
    let example = format!("{EXAMPLES}/grpo.toml");
    let out = kiln(&["data", "inspect", &example, "--set", &train, "--set", "data.eval=[]", "--samples", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("train: 16 prompts") && text.contains("16 with a reference answer"), "{text}");
    assert!(text.contains("What is 0 plus 1?<|im_end|>\n<|im_start|>assistant\n"), "{text}");
    assert!(text.contains(r#"columns for rewards: {"answer":"1","solution":"s0"}"#), "{text}");
}

/// A reward program scores each group as soon as its completions have finished (while other
/// sequences still decode): it is called once per group, with that group's completions.
#[test]
fn reward_programs_score_each_group_as_it_finishes() {
    let log = scratch_dir("per-group-log").join("calls.txt");
    let script =
        format!("n=0; while read -r l; do n=$((n+1)); echo 1; done; echo $n >> {:?}", log.display().to_string());
    let judge = format!(r#"grpo.rewards=[{{type = "command", name = "judge", command = ["sh", "-c", {script:?}]}}]"#);
    let settings = ["train.steps=2", "grpo.prompts_per_step=3", "grpo.group_size=4", "data.eval=[]", &judge];
    let (out, run) = grpo("per-group", &settings);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let calls: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    assert_eq!(calls, vec!["4"; 6], "one call per group of 4, 3 groups a step, 2 steps");
    let steps = step_metrics(&run);
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|v| v["rewards/judge/mean"] == 1.0 && v["reward"] == 1.0), "{steps:?}");
}

#[test]
fn a_failing_reward_command_stops_the_run_with_its_name() {
    let (out, _) = grpo(
        "failing",
        &[
            "train.steps=2",
            "grpo.rewards=[{type = \"command\", name = \"judge\", command = [\"sh\", \"-c\", \"exit 7\"]}]",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("reward `judge`") && stderr.contains("exited"), "{stderr}");
}

//! `kiln generate` in batch mode on the demo base: one line per prompt, limits and stop
//! strings honoured.

use std::process::Command;

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");
const PROMPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/grpo_prompts.jsonl");

fn generate(extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args =
        vec!["generate", "--model", BASE, "--prompts", PROMPTS, "--max-new-tokens", "6", "--temperature", "1"];
    args.extend(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::str::from_utf8(&out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn batch_generation_writes_one_line_per_prompt() {
    let lines = generate(&[]);
    assert_eq!(lines.len(), 100);
    for l in &lines {
        assert!(l["tokens"].as_u64().unwrap() <= 6, "{l}");
        assert!(["stop", "length"].contains(&l["finish"].as_str().unwrap()), "{l}");
    }
    assert_eq!(generate(&[]), lines, "the same seed samples the same completions");
    for l in generate(&["--stop", "1"]) {
        assert!(!l["completion"].as_str().unwrap().contains('1'), "{l}");
    }
}

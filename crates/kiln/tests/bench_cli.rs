//! `kiln bench train` runs end to end on a shipped model and reports what it promises.

use std::process::Command;

#[test]
fn bench_train_reports_speed_memory_and_a_falling_loss() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/qwen3/model");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "train", "--model", model, "--batch", "2", "--seq", "16", "--steps", "3", "--warmup", "1"])
        .output()
        .expect("run kiln");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tokens/s") && text.contains("peak RSS"), "{text}");
    // AdamW on one repeated batch must lower its loss.
    let line = text.lines().find(|l| l.trim_start().starts_with("loss")).expect("loss line");
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(nums.len() == 2 && nums[1] < nums[0], "{line}");
}

#[test]
fn bench_moe_compares_against_a_dense_mlp() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "bench",
            "moe",
            "--tokens",
            "64",
            "--hidden",
            "32",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--expert-ff",
            "16",
            "--steps",
            "2",
        ])
        .output()
        .expect("run kiln");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("MoE layer") && text.contains("dense MLP  fwd+bwd") && text.contains("intermediate 32"),
        "{text}"
    );
}

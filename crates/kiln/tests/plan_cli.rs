//! `kiln plan` end to end: JSON for scripts, a cluster file overriding the catalogue, and
//! clear refusals.

use std::process::{Command, Output};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../kiln-plan/models");

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_BACKTRACE", "0").output().expect("run kiln")
}

#[test]
fn plan_ranks_layouts_as_json_and_reads_cluster_files() {
    let model = format!("{MODELS}/deepseek_v4_pro.json");
    let out = kiln(&["plan", "--model", &model, "--cluster", "1000x910c", "--method", "grpo", "--json", "--top", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layouts = v["layouts"].as_array().unwrap();
    assert_eq!(layouts.len(), 3);
    let speeds: Vec<f64> = layouts.iter().map(|l| l["estimate"]["time"]["tokens_per_s"].as_f64().unwrap()).collect();
    assert!(speeds.windows(2).all(|w| w[0] >= w[1]), "ranked fastest first: {speeds:?}");
    for l in layouts {
        assert_eq!(l["estimate"]["fits"], true);
        assert!(l["estimate"]["memory"]["peak"].as_f64().unwrap() <= 128e9);
        assert!(l["estimate"]["time"]["rollout"].as_f64().unwrap() > 0.0);
    }
    assert!((v["model"]["total"].as_f64().unwrap() - 1.6e12).abs() < 0.05e12);

    // The same NPUs with a tenth of the memory: nothing fits, and the refusal says by how much,
    // after the parameter breakdown.
    let dir = std::env::temp_dir().join(format!("kiln-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("small.toml");
    std::fs::write(&file, "count = 1000\n[device]\nbase = \"910c\"\nhbm_gb = 12.8\n").unwrap();
    let out = kiln(&["plan", "--model", &model, "--cluster", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not fit on 1000 x 910c") && err.contains("11.5 GB usable"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parameters") && text.contains("routed experts"), "no breakdown before the refusal: {text}");
    std::fs::write(&file, "count = 8\n[device]\nbase = \"h100\"\nhbm = 1\n").unwrap();
    let out = kiln(&["plan", "--model", &model, "--cluster", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("small.toml") && err.contains("hbm"), "{err}");
}

#[test]
fn plan_explains_one_layout_and_refuses_one_that_does_not_divide() {
    let model = format!("{MODELS}/deepseek_v3.json");
    let layout = "dp=128,pp=16,ep=64,zero=1,recompute=selective";
    let out = kiln(&["plan", "--model", &model, "--cluster", "2048xh800", "--layout", layout, "--explain"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in
        ["671B parameters", "optimizer states", "expert parallel", "exposed communication", "What each term counts"]
    {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let out = kiln(&["plan", "--model", &model, "--cluster", "1000xh800", "--layout", "tp=8,pp=16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not divide the 1000 devices"), "{err}");
}

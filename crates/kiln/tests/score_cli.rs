//! `kiln score` end to end: agreement with transformers' log-probs in f32 and under bf16
//! autocast, and input errors.

use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixtures: under `KILN_FIXTURES` when set (tools/gpu/check.sh runs this test binary on a
/// machine where the source tree lies elsewhere).
fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs kiln: the binary `KILN_BIN` when set (with `KILN_BACKEND`, its `--backend`; the GPU
/// check runs these tests on CUDA that way), else this build's.
fn kiln(args: &[&str]) -> Output {
    let bin = std::env::var_os("KILN_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    let backend = std::env::var("KILN_BACKEND").unwrap_or_else(|_| "auto".into());
    Command::new(bin).args(["--backend", &backend]).args(args).output().expect("run kiln")
}

fn score(model: &Path, tokens: &Path, dtype: &str) -> Output {
    kiln(&["score", "--model", model.to_str().unwrap(), "--tokens", tokens.to_str().unwrap(), "--dtype", dtype])
}

/// A safetensors fixture's F32 tensor `name`, flattened.
fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F32);
    v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Scores the golden rows of `case` in `dtype`: kiln's log-probs, one row per input row.
fn score_golden_rows(case: &str, rows: &[Vec<i64>], dtype: &str) -> Vec<Vec<f64>> {
    let dir = scratch_dir(&format!("score-{case}-{dtype}"));
    let tokens = dir.join("tokens.jsonl");
    let text: String = rows.iter().map(|r| format!("{{\"ids\": {r:?}}}\n")).collect();
    std::fs::write(&tokens, text).unwrap();
    let out = score(&fixtures().join(case).join("model"), &tokens, dtype);
    assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), rows.len(), "{case}: one output line per input line");
    let logprobs = |line: &&str| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    lines.iter().map(logprobs).collect()
}

/// The golden token rows and transformers' log-probs for them.
fn golden(case: &str) -> (Vec<Vec<i64>>, Vec<Vec<f32>>) {
    let bytes = std::fs::read(fixtures().join(case).join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> Vec<i64> {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::I64);
        v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (ids, lengths) = (ints("input_ids"), ints("lengths"));
    let seq = st.tensor("logprobs").unwrap().shape()[1] + 1;
    let lp = f32s(&st, "logprobs");
    let rows = lengths.iter().enumerate().map(|(r, &n)| ids[r * seq..r * seq + n as usize].to_vec()).collect();
    let logprobs =
        lengths.iter().enumerate().map(|(r, &n)| lp[r * (seq - 1)..r * (seq - 1) + n as usize - 1].to_vec()).collect();
    (rows, logprobs)
}

#[test]
fn score_agrees_with_transformers_for_every_model_type() {
    let cases =
        ["llama", "mistral", "qwen2", "qwen3", "deepseek_v3", "deepseek_v3_plain", "deepseek_v4", "deepseek_v4_hc4"];
    for case in cases {
        let (rows, want) = golden(case);
        for (got, want) in score_golden_rows(case, &rows, "f32").iter().zip(&want) {
            assert_eq!(got.len(), want.len(), "{case}: len(ids) - 1 log-probs");
            for (t, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - *w as f64).abs() < 1e-4, "{case} token {t}: kiln {g}, transformers {w}");
            }
        }
    }
}

/// `--dtype bf16` against transformers under `torch.autocast(bfloat16)`, held (as the model
/// goldens are) to twice transformers' own bf16 noise, max |autocast − f32| over the case.
/// Dense models only: for MoE, rounding may turn over a router tie (kiln-model's bf16 goldens
/// handle that case token by token).
#[test]
fn score_in_bf16_agrees_with_transformers_autocast() {
    for case in ["llama", "mistral", "qwen2", "qwen3"] {
        let (rows, want_f32) = golden(case);
        let bytes = std::fs::read(fixtures().join(case).join("autocast_bf16.safetensors")).unwrap();
        let autocast = f32s(&SafeTensors::deserialize(&bytes).unwrap(), "logprobs");
        let stride = autocast.len() / rows.len();
        let mut pairs = Vec::new();
        for (r, got) in score_golden_rows(case, &rows, "bf16").iter().enumerate() {
            assert_eq!(got.len(), want_f32[r].len(), "{case}: len(ids) - 1 log-probs");
            pairs.extend(
                got.iter().zip(&want_f32[r]).zip(&autocast[r * stride..]).map(|((&g, &f), &a)| (g, f as f64, a as f64)),
            );
        }
        let noise = pairs.iter().map(|&(_, f, a)| (a - f).abs()).fold(0.0, f64::max);
        assert!(noise > 0.0, "{case}: the autocast fixture equals the f32 one");
        assert!(pairs.iter().any(|&(g, f, _)| (g - f).abs() > 1e-5), "{case}: --dtype bf16 gave f32's log-probs");
        for (t, &(g, _, a)) in pairs.iter().enumerate() {
            assert!((g - a).abs() <= 2.0 * noise, "{case} position {t}: kiln {g}, autocast {a}, noise {noise:.3e}");
        }
    }
}

#[test]
fn output_flag_writes_the_file() {
    let dir = scratch_dir("output");
    let out_path = dir.join("scores.jsonl");
    let out = kiln(&[
        "score",
        "--model",
        fixtures().join("llama/model").to_str().unwrap(),
        "--tokens",
        fixtures().join("score/tokens.jsonl").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    let text = std::fs::read_to_string(&out_path).unwrap();
    let lens: Vec<usize> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["logprobs"].as_array().unwrap().len())
        .collect();
    assert_eq!(lens, vec![6, 3, 9]);
}

#[test]
fn bad_lines_are_reported_with_their_number() {
    let model = fixtures().join("llama/model");
    let dir = scratch_dir("bad");
    for (name, text, expect) in [
        ("json", "{\"ids\": [1, 2]}\n{\"ids\": [1, 2\n", ":2: expected {\"ids\": [..]}"),
        (
            "vocab",
            "{\"ids\": [1, 2]}\n{\"ids\": [1, 2]}\n{\"ids\": [5, 96]}\n",
            ":3: field `ids[1]` = 96 is outside the vocabulary (0..96)",
        ),
        ("empty", "{\"ids\": [1, 2]}\n\n", ":2: empty line"),
        ("field", "{\"tokens\": [1, 2]}\n", ":1: expected {\"ids\": [..]}"),
    ] {
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let out = score(&model, &path, "auto");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: must fail");
        assert!(err.contains(&format!("{name}.jsonl{expect}")), "{name}: {err}");
    }
}

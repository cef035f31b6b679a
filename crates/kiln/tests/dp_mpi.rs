//! Data parallel over MPI on loopback (built with `--features mpi`; needs `mpirun`): the same
//! run on 1, 2 and 4 ranks — each rank a share of every step, gradients summed — gives the
//! same loss curve as one process with the whole step, and only rank 0 writes.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");

/// `kiln sft` on `ranks` processes (plain, without mpirun, for one), `grad_accum` each.
fn sft(ranks: usize, grad_accum: usize, out: &Path) -> Output {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let args = [
        "--threads".to_string(),
        "1".into(),
        "sft".into(),
        format!("{EXAMPLES}/sft.toml"),
        "--quiet".into(),
        "--set".into(),
        format!("output.dir={:?}", out.display().to_string()),
        "--set".into(),
        "train.steps=6".into(),
        "--set".into(),
        format!("train.grad_accum={grad_accum}"),
    ];
    let mut cmd = if ranks == 1 {
        Command::new(kiln)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "--allow-run-as-root", "-np", &ranks.to_string(), kiln]);
        c
    };
    cmd.args(&args).env("OMPI_MCA_rmaps_base_oversubscribe", "1").output().expect("run kiln (is mpirun installed?)")
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-dp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn one_two_and_four_ranks_give_the_same_loss_curve() {
    // Four micro-batches a step in every run: 1 x 4, 2 x 2, 4 x 1.
    let runs: Vec<(usize, Vec<f64>)> = [(1, 4), (2, 2), (4, 1)]
        .into_iter()
        .map(|(ranks, accum)| {
            let dir = scratch(&format!("{ranks}"));
            let out = sft(ranks, accum, &dir);
            assert!(out.status.success(), "{ranks} ranks: {}", String::from_utf8_lossy(&out.stderr));
            // Rank 0 alone reports.
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(stdout.matches("done after 6 steps").count(), 1, "{stdout}");
            (ranks, losses(&dir))
        })
        .collect();
    let reference = &runs[0].1;
    assert_eq!(reference.len(), 6);
    for (ranks, curve) in &runs[1..] {
        assert_eq!(curve.len(), reference.len(), "{ranks} ranks wrote one metrics line per step");
        for (step, (a, b)) in reference.iter().zip(curve).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "step {}: 1 rank {a}, {ranks} ranks {b}", step + 1);
        }
    }
}

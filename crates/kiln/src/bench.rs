//! `kiln bench train`: time forward + backward + AdamW steps on one batch shape.

use anyhow::Result;
use kiln_core::{rng::Rng, Cpu};
use kiln_model::{Activations, Batch, Config, Model};
use kiln_train::{zero_grads, AdamW};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Time training steps (forward, backward, AdamW) after warm-up.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Hugging Face model directory to load.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    model: Option<PathBuf>,
    /// config.json of a randomly initialised model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Recompute each layer's activations in backward instead of keeping them.
    #[arg(long)]
    recompute: bool,
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Matrix-product FLOPs of one training step: 6 per parameter per token for the linear
/// layers, plus causal attention (QKᵀ and PV: 2·2·T²/2·d per head per row, ×3 with backward).
fn step_flops(c: &Config, rows: usize, seq: usize) -> f64 {
    let tokens = (rows * seq) as f64;
    let (d, ff, hd) = (c.hidden_size as f64, c.intermediate_size as f64, c.head_dim as f64);
    let (qd, kvd) = (c.num_heads as f64 * hd, c.num_kv_heads as f64 * hd);
    let per_layer = d * (2.0 * qd + 2.0 * kvd) + 3.0 * d * ff;
    let linear = 6.0 * tokens * (c.num_layers as f64 * per_layer + d * c.vocab_size as f64);
    let attention = 3.0 * 2.0 * (rows as f64) * (seq as f64).powi(2) * qd * c.num_layers as f64;
    linear + attention
}

pub fn run(cmd: &Command) -> Result<()> {
    let Command::Train(args) = cmd;
    let b = Cpu;
    let mut model = match (&args.model, &args.config) {
        (Some(dir), _) => Model::load(&b, dir)?,
        (None, Some(config)) => Model::random(&b, Config::load(config)?, 0),
        (None, None) => unreachable!("clap requires --model or --config"),
    };
    let c = model.config.clone();
    let mut rng = Rng::new(1);
    let sequences: Vec<Vec<i32>> =
        (0..args.batch).map(|_| (0..args.seq).map(|_| rng.below(c.vocab_size) as i32).collect()).collect();
    let batch = Batch::causal_lm(&sequences);
    let mut acts = Activations::new(&b, &c, batch.rows, batch.seq, true, args.recompute);
    let mut grads = model.zeros_like_params(&b);
    let mut opt = AdamW::new(&b, &model.layout, 1e-4, 0.1);

    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::new();
    for step in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        zero_grads(&b, &mut grads);
        let loss = model.forward_backward(&b, &mut acts, &batch, &mut grads);
        opt.step(&b, &mut model.params, &grads);
        let dt = t0.elapsed().as_secs_f64();
        losses.push(loss);
        if step >= args.warmup {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens = batch.tokens() as f64;
    let flops = step_flops(&c, batch.rows, batch.seq);
    println!(
        "kiln bench train: {} params, batch {}x{}, {} threads, recompute {}",
        c.num_parameters(),
        batch.rows,
        batch.seq,
        rayon::current_num_threads(),
        args.recompute
    );
    println!(
        "  step      median {:.1} ms, mean {:.1} ms, min {:.1} ms ({} steps)",
        median * 1e3,
        mean * 1e3,
        times[0] * 1e3,
        times.len()
    );
    println!(
        "  speed     {:.0} tokens/s (median), {:.1} GFLOP/s of matrix products",
        tokens / median,
        flops / median / 1e9
    );
    println!("  loss      {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    match peak_rss_mib() {
        Some(mib) => println!("  peak RSS  {mib:.0} MiB"),
        None => println!("  peak RSS  unavailable on this platform"),
    }
    Ok(())
}

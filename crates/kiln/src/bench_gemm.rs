//! `kiln bench gemm`: the matrix products of one training step of a config, in f32 and with
//! bf16 inputs, GFLOP/s each (compare with `python bench/torch_gemm.py`, same shapes).

use anyhow::Result;
use kiln_core::{rng::Rng, Backend, Matmul, Precision};
use kiln_model::Config;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GemmArgs {
    /// config.json whose linear layers give the shapes.
    #[arg(long)]
    config: PathBuf,
    /// Tokens per step (rows of the activations).
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Timed calls per product (the median is reported) after two warm-up calls.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

/// Forward, input gradient and weight gradient of each distinct linear layer shape.
fn products(c: &Config, tokens: usize) -> Vec<(String, Matmul)> {
    let (d, ff, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let shapes =
        [("attention", d, c.num_heads * c.head_dim), ("mlp up", d, ff), ("mlp down", ff, d), ("lm head", d, v)];
    let mut out = Vec::new();
    for (name, d_in, d_out) in shapes {
        out.push((format!("{name} {d_in}->{d_out} forward"), Matmul::linear(tokens, d_in, d_out)));
        out.push((format!("{name} {d_in}->{d_out} dx"), Matmul::linear_dx(tokens, d_in, d_out, false)));
        out.push((format!("{name} {d_in}->{d_out} dw"), Matmul::linear_dw(tokens, d_in, d_out)));
    }
    out
}

pub fn run<B: Backend>(args: &GemmArgs, b: &B) -> Result<()> {
    let config = Config::load(&args.config)?;
    let mut rng = Rng::new(1);
    println!("kiln bench gemm on {}", b.device());
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "product (m x n x k)", "f32 ms", "GFLOP/s", "bf16 ms", "GFLOP/s", "ratio"
    );
    let (mut total_f32, mut total_bf16, mut flops) = (0.0, 0.0, 0.0);
    for (name, spec) in products(&config, args.tokens) {
        let a = b.upload(&rng.normal_vec(spec.m * spec.k, 1.0));
        let w = b.upload(&rng.normal_vec(spec.k * spec.n, 1.0));
        let mut c = b.zeros(spec.m * spec.n);
        let mut time = |precision| {
            crate::bench::median_time(args.runs, || {
                b.matmul(&mut c, &a, &w, spec.in_precision(precision));
                b.synchronize();
            })
        };
        // Interleaved: f32, bf16, and again, keeping each precision's faster median.
        let (f1, h1) = (time(Precision::F32), time(Precision::Bf16));
        let (f2, h2) = (time(Precision::F32), time(Precision::Bf16));
        let (f, h) = (f1.min(f2), h1.min(h2));
        let gflop = 2.0 * (spec.m * spec.n * spec.k) as f64 / 1e9;
        println!(
            "{:<34} {:>9.3} {:>9.0} {:>9.3} {:>9.0} {:>6.2}x",
            name,
            f * 1e3,
            gflop / f,
            h * 1e3,
            gflop / h,
            f / h
        );
        (total_f32, total_bf16, flops) = (total_f32 + f, total_bf16 + h, flops + gflop);
    }
    println!(
        "{:<34} {:>9.3} {:>9.0} {:>9.3} {:>9.0} {:>6.2}x",
        "all of them",
        total_f32 * 1e3,
        flops / total_f32,
        total_bf16 * 1e3,
        flops / total_bf16,
        total_f32 / total_bf16
    );
    Ok(())
}
